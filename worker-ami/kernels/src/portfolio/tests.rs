//! Accuracy, property, determinism and resume tests of the whole kernel.
