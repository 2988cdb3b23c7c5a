"""The real-VM fixtures (the guest image) for the migration tests."""

from tests.hypervisor.vm.conftest import vm_image

__all__ = ["vm_image"]
