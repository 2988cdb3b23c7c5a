"""Tests that boot real QEMU TCG guests from the vm-images image (marked ``vm``)."""
