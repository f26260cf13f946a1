"""Coverage-guided fuzzing with atheris (issue 6 "Tests that must exist": fuzzing, hardened input §8).

Two targets, each a module runnable as ``python -m fuzz.<target> [libFuzzer flags] [corpus dirs]``:

* :mod:`fuzz.stow` — a STOW-RS request without the HTTP layer: the ``Content-Type`` check
  (``dicomweb.stow._boundary``), the streaming multipart parser and spooler
  (``dicomweb.multipart.spool_parts``, fed in chunks of a fuzzed size) and the ingest of every part;
* :mod:`fuzz.cstore` — the C-STORE data set ingest, ``gateway.ingest.Ingest.accept_file`` on a
  temporary archive (SQLite catalog + folder blob store).

Invariants checked on every input (an ``AssertionError`` is a finding: libFuzzer stops and saves
the input as ``crash-<sha1>``): no exception other than the documented refusals; every refusal
carries a non-empty reason; a refused input leaves the catalog and the blob store exactly as they
were (no partial write); after each input the catalog references exactly the blobs the store
holds, and no spool file is left behind.

``python -m fuzz --minutes N`` runs both for longer with a corpus kept in ``var/fuzz/`` (see
``docs/security.md``); ``tests/test_fuzz_atheris.py`` runs each for a few thousand inputs in CI.
Seeds (:func:`fuzz.common.write_seeds`) come from the test suite's inputs: the small instances of
``tests/test_fuzz.py`` and the headers of the demo sample set (``gateway.sample``).
"""
