# On PYTHONPATH ahead of the real uvloop, this hides it: uvicorn's "auto"
# loop then falls back to asyncio's, so the end-to-end tests run under both.
raise ImportError("uvloop is hidden by the test (tests/shims/no_uvloop): run under asyncio's event loop")
