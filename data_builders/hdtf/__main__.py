"""`python -m data_builders.hdtf --manual_dir=RAW --data_dir=DATA --config=params [--also_tfrecord]`:
the `tfds build` command for this dataset (see hdtf_dataset_builder.main)."""
from data_builders.hdtf.hdtf_dataset_builder import main

if __name__ == "__main__":
  main()
