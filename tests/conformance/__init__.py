"""Conformance suite: modules nobody here wrote, driven through our strategies as a user would drive them.

Lightning's own demo models (``BoringModel``, ``ManualOptimBoringModel``, the ``LightningTransformer`` language
model on random tokens) and a torchmetrics classifier with BatchNorm, under ``mpi`` (compared with Lightning's
DDP on gloo launched in the same MPI job, or with one process on the union of the ranks' batches), ``async``
(compared with one process where one worker makes it deterministic, otherwise checked for its invariants) and
``hybrid`` (foreign modules refused in one line; the classifier with the three pipeline methods a user adds
equal to one process).

Each strategy (and world size) runs one MPI job that goes through many cases in sequence (``*_job.py`` here);
each case saves what every rank saw, or its error and traceback, so one broken case hides no other. The
pytest files run each job once (module-scoped fixtures) and check one case per test function.
"""
