#!/usr/bin/env python
"""Thin entry point: `python train.py [+experiment=NAME] [key=value ...]` (see conf/ and README)."""
import hydra

from cwic_exp.config import register_schema
from cwic_exp.train import main_from_hydra

register_schema()


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg):
    main_from_hydra(cfg)


if __name__ == "__main__":
    main()
