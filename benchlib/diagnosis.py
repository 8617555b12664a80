"""Why not more: per-layer realization of a variant against its dense baseline, and tags.

Layers of the variant's and the dense cell's profiles (``benchlib.layer_profile``) are joined
by name (structured pruning keeps module names, masks keep shapes). Per layer l:

* F_l = dense MACs / variant nonzero MACs, T_l = dense time / variant time,
  eta_l = (1 - 1/T_l) / (1 - 1/F_l) (``benchlib.analysis.realization``);
* expected time = dense time x variant nonzero MACs / dense MACs (the time the FLOP count
  promises; a layer without MACs, the FLOP count's blind spot, is expected to shrink like the
  whole model: dense time / F); lost time = variant time - expected time. The layers that hold
  back realization are those that lost the most.

Tags state a counted or measured fact against a threshold (the constants below):

* memory-bound: under MEMORY_BOUND_FLOP_PER_BYTE FLOP per byte moved (norms, activations,
  pooling have no MACs at all; a depthwise conv has about 2);
* per-op overhead: F_l >= 2 but T_l <= SAME_SPEED on a layer under TINY_LAYER_S (such a
  layer gets no alignment or thin tag: its fixed cost explains it);
* left dense (Amdahl): a layer with MACs that the spec did not change;
* masked, not removed: at least MASKED_ZEROS of its MACs are zeros and T_l <= SAME_SPEED (no
  faster, or slower);
* alignment: a channel count that is a multiple of ALIGN in the dense model and not in the
  variant, on a layer realizing under ETA_LOW;
* thin: arithmetic intensity fell under THIN_RATIO of the dense layer's, eta_l under ETA_LOW;
* T>F: T_l above F_l x (1 + ABOVE_MARGIN), a cache effect.

``cell_findings`` needs no profile (any target): a sparse format below break-even (the target
ran layers sparse and the cell is slower than its dense baseline) and T > F.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from benchlib.analysis import ABOVE_THEORY, DENSE, Row, realization
from benchlib.errors import ConfigError
from benchlib.layer_profile import OTHER, LayerProfile, LayerTime
from benchlib.results import CellKey, CellRecord

MEMORY_BOUND_FLOP_PER_BYTE = 4.0
TINY_LAYER_S = 100e-6
SAME_SPEED = 1.25
MASKED_ZEROS = 0.05
ALIGN = 8
ETA_LOW = 0.5
THIN_RATIO = 0.75
ABOVE_MARGIN = 0.10
SHARE_WORTH_NAMING = 0.10
"""A cell-level finding is stated when its layers hold at least this share of the time."""
MASKED_SHARE = 0.5
"""... or, for masks, when at least this share of the removed MACs are zeros still computed."""
HELD_BACK = 5


@dataclass(frozen=True, kw_only=True)
class LayerFinding:
    """One layer joined across the dense and the variant cell; seconds per inference, MACs per
    image, intensities in FLOP/byte, shares of the variant's totals."""

    name: str
    kind: str
    dense_s: float
    variant_s: float
    dense_macs: int
    nonzero_macs: int
    flops_ratio: float | None
    speedup: float | None
    realization: float | None
    expected_s: float
    lost_s: float
    mac_share: float
    time_share: float
    dense_intensity: float | None
    variant_intensity: float | None
    pruned: bool
    tags: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class Explanation:
    """A variant cell explained layer by layer. ``*_total_s`` are profiled seconds per
    inference, ``*_median_s`` the medians of the cells' samples, ``*_unprofiled_s`` the
    medians of the unprofiled inferences timed around each profile (None in older runs)."""

    key: CellKey
    clock: str
    flops_ratio: float | None
    layers: tuple[LayerFinding, ...]
    dense_total_s: float
    variant_total_s: float
    dense_median_s: float | None
    variant_median_s: float | None
    findings: tuple[str, ...]
    dense_unprofiled_s: float | None = None
    variant_unprofiled_s: float | None = None

    @property
    def coverage(self) -> float | None:
        """Profiled total / end-to-end latency of the variant: how well the layers add up.
        The latency is that of the unprofiled inferences interleaved with the profiled ones
        where the profile has them, else the cell's median."""
        reference = self.variant_unprofiled_s or self.variant_median_s
        if not reference:
            return None
        return self.variant_total_s / reference

    @property
    def median_coverage(self) -> float | None:
        """Profiled total / the cell's median (drift between the two passes shows here)."""
        if not self.variant_median_s:
            return None
        return self.variant_total_s / self.variant_median_s

    @property
    def held_back(self) -> tuple[LayerFinding, ...]:
        """The layers that lost the most time against their FLOP count, most first."""
        ranked = sorted((f for f in self.layers if f.lost_s > 0), key=lambda f: -f.lost_s)
        return tuple(ranked[:HELD_BACK])


def profile_of(record: CellRecord) -> LayerProfile:
    """The record's layer profile; ConfigError when the cell was not profiled."""
    if record.layer_profile is None:
        raise ConfigError(
            f"cell {record.key.label()} has no layer profile; run it with bench run "
            "--profile-layers (eager targets only)"
        )
    return LayerProfile.from_dict(record.layer_profile)


def _median(record: CellRecord) -> float | None:
    return statistics.median(record.samples_s) if record.samples_s else None


def explain(variant: CellRecord, dense: CellRecord) -> Explanation:
    """Join the two cells' profiles and tag each layer. ``dense`` may be ``variant`` itself
    (a dense cell: shares only, nothing to realize). Raises ConfigError without profiles."""
    mine, base = profile_of(variant), profile_of(dense)
    dense_macs = dense.flops.get("macs")
    nonzero = variant.flops.get("nonzero_macs")
    whole = dense_macs / nonzero if dense_macs and nonzero else None
    old = base.by_name()
    names = [*(x.name for x in mine.layers), *old]
    total_s = mine.total_s or 1.0
    total_macs = sum(x.nonzero_macs for x in mine.layers) or 1
    new = mine.by_name()
    found = []
    for name in (*(n for n in dict.fromkeys(names) if n != OTHER), OTHER):
        layer, before = new.get(name), old.get(name)
        found.append(_finding(name, layer, before, mine.batch_size, whole, total_s, total_macs))
    findings = _findings(found, whole)
    return Explanation(
        key=variant.key,
        clock=mine.clock,
        flops_ratio=whole,
        layers=tuple(found),
        dense_total_s=base.total_s,
        variant_total_s=mine.total_s,
        dense_median_s=_median(dense),
        variant_median_s=_median(variant),
        findings=findings,
        dense_unprofiled_s=base.unprofiled_s,
        variant_unprofiled_s=mine.unprofiled_s,
    )


def profiled_baseline(records: Sequence[CellRecord], key: CellKey) -> CellRecord | None:
    """The profiled dense cell to explain the variant cell ``key`` against: of the dense
    measurements of its group (the opening one and the repeat after the variants), the one
    whose interleaved unprofiled latency is lowest, as interference only ever adds time (a
    profile without that latency counts as slowest); None when no dense cell was profiled."""
    dense_key = dataclasses.replace(key, spec=DENSE, repeat=0)
    profiled = [
        r
        for r in records
        if dataclasses.replace(r.key, repeat=0) == dense_key and r.layer_profile is not None
    ]

    def latency(record: CellRecord) -> float:
        seconds = (record.layer_profile or {}).get("unprofiled_s")
        return float(seconds) if seconds is not None else float("inf")

    return min(profiled, key=latency, default=None)


def explain_run(records: Sequence[CellRecord]) -> list[Explanation]:
    """Every variant cell of a run that was profiled, explained against its profiled dense
    cell (:func:`profiled_baseline`), in the run's order; cells without either profile are
    left out."""
    found = []
    for record in records:
        if record.key.spec == DENSE or record.key.repeat or record.layer_profile is None:
            continue
        base = profiled_baseline(records, record.key)
        if base is not None:
            found.append(explain(record, base))
    return found


def _finding(
    name: str,
    layer: LayerTime | None,
    before: LayerTime | None,
    batch: int,
    whole: float | None,
    total_s: float,
    total_macs: int,
) -> LayerFinding:
    variant_s = layer.time_s if layer else 0.0
    dense_s = before.time_s if before else 0.0
    dense_macs = before.macs if before else 0
    nonzero = layer.nonzero_macs if layer else 0
    ratio = dense_macs / nonzero if dense_macs and nonzero else None
    if dense_macs:
        expected = dense_s * nonzero / dense_macs
    else:
        expected = dense_s / whole if whole else dense_s
    speedup = dense_s / variant_s if variant_s > 0 and dense_s > 0 else None
    eta = realization(ratio, speedup) if ratio is not None and speedup is not None else None
    finding = LayerFinding(
        name=name,
        kind=next((x.kind for x in (layer, before) if x is not None), "?"),
        dense_s=dense_s,
        variant_s=variant_s,
        dense_macs=dense_macs,
        nonzero_macs=nonzero,
        flops_ratio=ratio,
        speedup=speedup,
        realization=eta,
        expected_s=expected,
        lost_s=variant_s - expected,
        mac_share=nonzero / total_macs,
        time_share=variant_s / total_s,
        dense_intensity=before.intensity(batch) if before else None,
        variant_intensity=layer.intensity(batch) if layer else None,
        pruned=bool(layer and layer.pruned),
        tags=(),
    )
    return _tagged(finding, layer, before)


def _tagged(f: LayerFinding, layer: LayerTime | None, before: LayerTime | None) -> LayerFinding:
    tags = []
    intensity = f.variant_intensity
    if f.name != OTHER and layer is not None and layer.bytes:
        if not layer.macs:
            tags.append("memory-bound (no MACs)")
        elif intensity is not None and intensity < MEMORY_BOUND_FLOP_PER_BYTE:
            tags.append(f"memory-bound ({intensity:.1f} FLOP/B)")
    same = f.speedup is not None and 1 / SAME_SPEED <= f.speedup <= SAME_SPEED
    overhead = bool(f.flops_ratio and f.flops_ratio >= 2 and same and f.variant_s < TINY_LAYER_S)
    if overhead:  # the fixed cost dominates: alignment and thinness do not explain this layer
        tags.append("per-op overhead")
    if layer is not None and layer.macs and not layer.pruned and f.name != OTHER:
        tags.append("left dense")
    not_faster = f.speedup is not None and f.speedup <= SAME_SPEED
    if layer is not None and layer.macs and not_faster:
        zeros = 1 - layer.nonzero_macs / layer.macs
        if zeros >= MASKED_ZEROS:
            tags.append(f"masked, not removed ({zeros:.0%} zeros)")
    low = f.realization is not None and f.realization < ETA_LOW and not overhead
    if low and layer and before and layer.channels and before.channels:
        pairs = zip(layer.channels, before.channels, strict=True)
        odd = [c for c, d in pairs if d % ALIGN == 0 and c % ALIGN]
        if odd:
            tags.append(f"channels {odd[0]} not a multiple of {ALIGN}")
    if low and f.dense_intensity and intensity and intensity < THIN_RATIO * f.dense_intensity:
        tags.append(f"thin ({f.dense_intensity:.0f}->{intensity:.0f} FLOP/B)")
    if f.flops_ratio and f.speedup and f.speedup > f.flops_ratio * (1 + ABOVE_MARGIN):
        tags.append("T>F: cache effect")
    return LayerFinding(**{**f.__dict__, "tags": tuple(tags)})


def _share(found: Sequence[LayerFinding], prefix: str) -> tuple[list[LayerFinding], float]:
    tagged = [f for f in found if any(t.startswith(prefix) for t in f.tags)]
    return tagged, sum(f.time_share for f in tagged)


def _count(found: Sequence[LayerFinding]) -> str:
    return f"{len(found)} layer" + ("" if len(found) == 1 else "s")


def _names(found: Sequence[LayerFinding], limit: int = 3) -> str:
    ranked = sorted(found, key=lambda f: -f.variant_s)
    more = f" and {len(ranked) - limit} more" if len(ranked) > limit else ""
    return ", ".join(f.name for f in ranked[:limit]) + more


def _findings(found: Sequence[LayerFinding], whole: float | None) -> tuple[str, ...]:
    """Cell-level sentences, each with the numbers it rests on; thresholds in the module doc."""
    lines = []
    memory, share = _share(found, "memory-bound")
    if share >= SHARE_WORTH_NAMING:
        macs = sum(f.mac_share for f in memory)
        lines.append(
            f"memory-bound: {_count(memory)} under {MEMORY_BOUND_FLOP_PER_BYTE:g} FLOP/byte "
            f"(norms, activations, pooling, depthwise convs) hold {share:.0%} of the time and "
            f"{macs:.1%} of the MACs; FLOPs do not count their work"
        )
    other = next(f for f in found if f.name == OTHER)
    if other.time_share >= SHARE_WORTH_NAMING:
        lines.append(
            f"outside any layer (residual adds, reshapes, Python glue): {other.time_share:.0%} "
            "of the time and no MACs"
        )
    tiny, share = _share(found, "per-op overhead")
    if tiny:
        lines.append(
            f"per-op overhead: {_count(tiny)} under {TINY_LAYER_S * 1e6:.0f} us barely got "
            f"faster (T_l <= {SAME_SPEED}) although their MACs fell 2-fold or more "
            f"({_names(tiny)}): {share:.0%} of the time"
        )
    dense_left, share = _share(found, "left dense")
    dense_total = sum(f.dense_s for f in found)
    if whole and whole > 1 and share >= SHARE_WORTH_NAMING:
        kept = sum(f.dense_s for f in dense_left)
        cap = f"; alone they cap T at {dense_total / kept:.1f}x" if kept else ""
        lines.append(
            f"unpruned layers (Amdahl): {_count(dense_left)} the spec left dense "
            f"({_names(dense_left)}) hold {share:.0%} of the variant's time{cap}"
        )
    masked, _ = _share(found, "masked")
    removed = sum(f.dense_macs for f in found) - sum(f.nonzero_macs for f in found)
    zeros = sum(f.dense_macs - f.nonzero_macs for f in masked)
    if masked and removed > 0 and zeros / removed >= MASKED_SHARE:
        lines.append(
            f"masked, not removed: {zeros / removed:.0%} of the removed MACs are zeros that "
            f"dense kernels still multiply ({_count(masked)} no faster than dense)"
        )
    for prefix, text in (
        ("channels", f"channels not a multiple of {ALIGN} (alignment)"),
        ("thin", "thin layers: arithmetic intensity fell"),
        ("T>F", "T > F: cache effect"),
    ):
        tagged, share = _share(found, prefix)
        if tagged:
            lines.append(f"{text}: {_count(tagged)} ({_names(tagged)}), {share:.0%} of time")
    return tuple(lines)


def cell_findings(record: CellRecord, row: Row) -> tuple[str, ...]:
    """What the cell's record and summary row say without a profile (any target)."""
    lines = []
    speedup = row.speedup_measured
    layers = record.info.get("layers")
    sparse = [
        layer
        for layer in (layers if isinstance(layers, Sequence) else ())
        if isinstance(layer, Mapping) and layer.get("sparse")
    ]
    if sparse and speedup is not None and speedup < 1:
        formats = ", ".join(sorted({str(layer.get("format", "?")) for layer in sparse}))
        lines.append(
            f"sparse format below break-even: {len(sparse)} layers ran sparse ({formats}) and "
            f"the cell is {1 / speedup:.2f}x slower than dense on {record.key.target}"
        )
    if ABOVE_THEORY in row.flags and speedup is not None and row.speedup_theoretical:
        lines.append(
            f"T > F: measured {speedup:.2f}x beats the FLOPs ratio "
            f"{row.speedup_theoretical:.2f}x (a cache or step effect)"
        )
    return tuple(lines)
