"""Renderers: pure functions from results to rich renderables (and, later, Markdown and plots)."""
