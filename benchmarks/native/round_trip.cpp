// The round trip of a cache line between two CPUs: two threads pinned to them pass a counter
// back and forth; prints the mean nanoseconds per round trip. On the shared 2-vCPU VM it
// tells where the host placed the vCPUs for the moment (see benchmarks/sparse_kernels.py):
// about 50-120 ns within one CCX, 330-440 ns across CCDs.
//
//     round_trip [cpu_a=0] [cpu_b=1] [round_trips=100000]

#include <pthread.h>
#include <sched.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <thread>

namespace {

alignas(64) std::atomic<long> counter{0};

bool pin(int cpu) {
  cpu_set_t set;
  CPU_ZERO(&set);
  CPU_SET(cpu, &set);
  return pthread_setaffinity_np(pthread_self(), sizeof set, &set) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  const int a = argc > 1 ? std::atoi(argv[1]) : 0, b = argc > 2 ? std::atoi(argv[2]) : 1;
  const long trips = argc > 3 ? std::atol(argv[3]) : 100000;
  std::atomic<bool> ok{true};
  std::thread other([&] {  // answers each odd count with the next even one
    if (!pin(b)) ok = false;
    for (long v = 1; v < 2 * trips; v += 2) {
      while (counter.load(std::memory_order_acquire) != v) {
        if (!ok) return;
      }
      counter.store(v + 1, std::memory_order_release);
    }
  });
  if (!pin(a)) ok = false;
  const auto start = std::chrono::steady_clock::now();
  for (long v = 0; v < 2 * trips && ok; v += 2) {
    counter.store(v + 1, std::memory_order_release);
    while (counter.load(std::memory_order_acquire) != v + 2) {
      if (!ok) break;
    }
  }
  const double ns =
      std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count();
  other.join();
  if (!ok) {
    std::fprintf(stderr, "cannot pin to cpus %d and %d\n", a, b);
    return 1;
  }
  std::printf("%.0f\n", ns / trips);
  return 0;
}
