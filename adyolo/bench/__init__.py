"""The training-step benchmark behind `launch/bench.py`: a grid of configurations (`grid`), each row run
in fresh processes (`runner`) that time real training steps (`worker`), the data loader (`loader`),
and the reports (`report`); `main.run_benchmark` ties them together."""
