"""Train TGSR: `accelerate launch train_tgsr.py --config configs/tgsr.yaml [key=value ...]`."""

from seesr.training.tgsr import main

if __name__ == "__main__":
    main()
