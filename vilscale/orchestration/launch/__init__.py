"""Getting ranks running. `preflight` checks everything that can be checked before any rank starts;
`session` runs a launch on this machine in the order that keeps run dirs safe (check, lock, write,
run); `local` starts ranks with torchrun's elastic agent; `slurm` (submitit) and `ray` (Jobs + Train)
submit to clusters; `rank` is the per-process entry point and `exit_codes` says which failures a
restart can fix."""
