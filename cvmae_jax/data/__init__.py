"""MEDS reading, lab statistics, TFDS dataset and the grain input pipeline."""
