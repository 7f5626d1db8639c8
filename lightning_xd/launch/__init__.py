"""From a command line to a running job: ``cli`` (train.py's flags), ``registry`` (the names of
models, datasets and strategies), ``runner`` (data, model, strategy and Trainer built, trained,
tested), ``launcher`` (mpirun for --nprocs), ``cores`` (threads per process) and
``lightning_names`` (our strategy names in Lightning's registry)."""
