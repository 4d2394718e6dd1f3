"""Stage entrypoints (thin `main(argv)` wrappers over `groupvit` functions) and Prefect flows."""
