"""HDTF TFDS dataset: `hdtf_dataset_builder.Builder` (import it to register `hdtf`)."""
