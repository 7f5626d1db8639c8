"""How work and gradients are split over processes: gradient buckets (synchronous averaging),
the parameter server (asynchronous), pipeline stages and micro-batches, deferred initialisation
of a model's parameters, and synchronised BatchNorm."""
