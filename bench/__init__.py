"""Benchmarks: each script prints ratios against a baseline measured in the same run; ``python -m bench``
runs them all with their correctness checks (bench/run.py)."""


def add_allocator_option(parser) -> None:
    """``--allocator keep|default`` for a benchmark's command line (applied by ``use_allocator``)."""
    parser.add_argument("--allocator", choices=["keep", "default"], default="keep",
                        help="keep (default): glibc's malloc keeps freed memory, as the trainer sets it on the CPU "
                             "(train.keep_freed_memory), for both sides of every comparison; default: glibc's own, "
                             "whose page faults cost HF's large temporaries far more than ours (docs/perf.md)")


def use_allocator(choice: str) -> None:
    """Apply ``--allocator`` to this process (before the benchmarks allocate)."""
    if choice == "keep":
        from train.runtime import keep_freed_host_memory

        keep_freed_host_memory()
