"""DAPE training: `accelerate launch train_dape.py --config configs/dape.yaml [key=value ...]`."""

from dape.train import main

if __name__ == "__main__":
    main()
