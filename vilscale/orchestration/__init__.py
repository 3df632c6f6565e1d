"""The top layer: from a job spec to ranks training on one machine or a cluster.

One folder per concern; dependencies run one way, ``cli -> launch -> training -> {checkpoint, config}``
(and the model and data packages below them):

- ``config/``     the job spec (frozen dataclasses), strict YAML loading with ``--set`` overrides
- ``training/``   one rank's runtime: process group and device, model and DeepSpeed engine, optimizer and
                  schedule, the step and its non-finite policy, EMA, evaluation, metrics, the loop
- ``checkpoint/`` what a run keeps on storage: checkpoints with manifest and atomic ``latest``, rank RNG
                  state, consolidated weights, the run directory's lock, spec and id
- ``launch/``     getting ranks running: pre-flight checks, the local launcher (torchrun's agent), SLURM
                  (submitit), Ray (Jobs + Train), the rank entry point and its exit codes
- ``cli/``        one small module per ``vilscale`` subcommand of this layer
- ``faults.py``   deterministic fault injection for the fault-tolerance tests
"""
