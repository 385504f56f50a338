"""SeeSR training: `accelerate launch train_controlnet.py --config configs/controlnet.yaml [key=value ...]`."""

from seesr.training.controlnet import main

if __name__ == "__main__":
    main()
