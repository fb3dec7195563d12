"""Pretrain a VO-MAE: python train.py --config=configs/demo.py --workdir=runs/demo"""

from cvmae_jax.cli import train_main

if __name__ == "__main__":
    train_main()
