"""The benchmark and memory-profiling harness behind ``duallora bench``, ``duallora profile-memory``
and the pytest-benchmark suite in ``bench/`` (DESIGN §4: fused vs unfused vs frozen-only on the
same shapes, in one run, written to JSON with the device name). One module per job:

* :mod:`.problems`       what is measured: the matrix (shapes, ranks, dtypes, ``--quick``), the
  goals reported against, one layer's random tensors (:class:`~.problems.LayerProblem`)
* :mod:`.variants`       what runs on a problem: fused, unfused (eager and torch.compile'd),
  frozen, PEFT; one forward or forward+backward step of each
* :mod:`.devices`        the device: ``--device``, its name, slug and data-sheet peaks
* :mod:`.timing`         timing a step, FLOP and byte counts, the ``timing`` and ``comparison``
  rows, and :func:`~.timing.run_bench` (the whole matrix)
* :mod:`.device_ops`     the device operations of one forward+backward (``op_count`` rows)
* :mod:`.saved_bytes`    bytes autograd saves for backward (``saved_bytes`` rows)
* :mod:`.vit_models`     whole timm ViTs adapted as each variant, and their training step
* :mod:`.device_memory`  GPU peak memory of a step and the largest batch under a budget
  (``step_memory`` and ``max_batch`` rows)
* :mod:`.memory_profile` what ``duallora profile-memory`` runs, as result rows
* :mod:`.results`        the JSON document: header, schema ``duallora-bench/2``, validation, writing
* :mod:`.tables`         text and markdown tables, and the README's performance section

Import the module you need (``from duallora_kernels.harness import problems``); this package
re-exports nothing.
"""
