"""One module per pipeline stage, each with `main(argv) -> int`."""
