"""Image classification: offline domains (digits, MNIST, LFW, Fashion-MNIST), the runner and one-vs-rest detectors."""
