"""Train a TinyFlux student on cached features.

    python train_tinyflux.py --cache runs/cache --model tiny --total_steps 200 --checkpoint_dir runs/ckpt
    accelerate launch --config_file accelerate_configs/cpu_2proc.yaml train_tinyflux.py --config run.yaml
    python train_tinyflux.py --config run.yaml --resume latest

Every TrainerConfig and TinyFluxConfig field is a flag (see --help) and a key of --config FILE.yaml; flags win.
docs/TRAINING.md describes the run, its checkpoints and its logs.
"""

from tinyflux.trainer.main import main

if __name__ == "__main__":
    raise SystemExit(main())
