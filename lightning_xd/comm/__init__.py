"""The communication layer: the only code that calls mpi4py.

``communicator`` (the job's processes and their collectives on tensors), ``flat`` (many tensors as
one contiguous buffer), ``collectives`` (Lightning's reduce / all_gather / broadcast / barrier and
torchmetrics' gathers over a communicator), ``environment`` (ranks, hosts and devices of the job)
and ``ulfm`` (noticing and surviving a lost process).
"""
