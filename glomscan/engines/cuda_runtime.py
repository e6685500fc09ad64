"""The few CUDA runtime calls the TensorRT engine needs, through NVIDIA's ``cuda-bindings``
package (``pip install "glomscan[gpu]"``), so a GPU analysis install runs without torch.

Device memory, pinned host memory, one stream, asynchronous copies and the GPU's name and
compute capability; every call's error code is checked and raised with CUDA's own message.
The driver comes from the host (in Docker: the NVIDIA container toolkit, ``--gpus all``).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

import numpy as np

NVIDIA_DRIVER_NODE = "/dev/nvidiactl"
NO_GPU_HINT = "in Docker, start the container with --gpus all (the NVIDIA container toolkit)"


class CudaUnavailable(RuntimeError):
    """No usable CUDA GPU, or the CUDA runtime bindings are missing."""


def nvidia_driver_loaded() -> bool:
    """An NVIDIA kernel driver is visible to this process (a container started without
    ``--gpus`` has no ``/dev/nvidiactl``)."""
    return os.path.exists(NVIDIA_DRIVER_NODE)


def import_cudart():
    """The CUDA runtime bindings module (cuda-bindings >= 12.6 names it ``cuda.bindings.runtime``,
    older cuda-python ``cuda.cudart``); raises CudaUnavailable when neither is installed."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise CudaUnavailable("the cuda-bindings package is not installed (pip install \"glomscan[gpu]\")") from None
    return cudart


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "9.0"
    memory_total_mib: float


class CudaRuntime:
    """One GPU (device 0) through the CUDA runtime bindings. ``cudart`` is the bindings module
    (tests pass a stand-in)."""

    def __init__(self, cudart=None):
        self.cudart = cudart if cudart is not None else import_cudart()

    def _check(self, result):
        """Unpack a bindings call's (error, *values) and raise on an error code."""
        error, *values = result if isinstance(result, tuple) else (result,)
        if error != self.cudart.cudaError_t.cudaSuccess:
            _, text = self.cudart.cudaGetErrorString(error)
            raise CudaUnavailable(f"CUDA error {int(error)}: {text.decode() if isinstance(text, bytes) else text}")
        return values[0] if len(values) == 1 else tuple(values)

    def device_count(self) -> int:
        """CUDA devices visible to this process (0 without an NVIDIA driver)."""
        if not nvidia_driver_loaded():
            return 0
        return int(self._check(self.cudart.cudaGetDeviceCount()))

    def gpu(self) -> GpuInfo:
        """Device 0, or CudaUnavailable saying why there is none."""
        if not nvidia_driver_loaded():
            raise CudaUnavailable(f"no NVIDIA GPU visible (no {NVIDIA_DRIVER_NODE}); {NO_GPU_HINT}")
        if self.device_count() < 1:
            raise CudaUnavailable(f"the NVIDIA driver reports no CUDA device; {NO_GPU_HINT}")
        props = self._check(self.cudart.cudaGetDeviceProperties(0))
        name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
        return GpuInfo(name=name, compute_capability=f"{props.major}.{props.minor}",
                       memory_total_mib=round(props.totalGlobalMem / 2 ** 20, 1))

    def stream(self) -> int:
        return self._check(self.cudart.cudaStreamCreate())

    def synchronize(self, stream) -> None:
        self._check(self.cudart.cudaStreamSynchronize(stream))

    def device_buffer(self, nbytes: int) -> "DeviceBuffer":
        return DeviceBuffer(self, nbytes)

    def pinned_array(self, shape: tuple[int, ...], dtype=np.float32) -> "PinnedArray":
        return PinnedArray(self, shape, dtype)

    def copy_to_device(self, device: "DeviceBuffer", host: "PinnedArray", stream) -> None:
        self._check(self.cudart.cudaMemcpyAsync(device.address, host.address, host.nbytes,
                                                self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def copy_to_host(self, host: "PinnedArray", device: "DeviceBuffer", stream) -> None:
        self._check(self.cudart.cudaMemcpyAsync(host.address, device.address, host.nbytes,
                                                self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))


class _Allocation:
    """``nbytes`` of memory from the CUDA runtime (``_allocate`` / ``_release`` name the calls),
    freed by ``free`` or when collected."""

    _allocate = _release = ""

    def __init__(self, runtime: CudaRuntime, nbytes: int):
        self.runtime, self.nbytes = runtime, int(nbytes)
        self.address = int(runtime._check(getattr(runtime.cudart, self._allocate)(self.nbytes)))

    def free(self) -> None:
        if self.address:
            self.runtime._check(getattr(self.runtime.cudart, self._release)(self.address))
            self.address = 0

    def __del__(self):  # pragma: no cover - best effort at interpreter exit
        try:
            self.free()
        except Exception:
            pass


class DeviceBuffer(_Allocation):
    """``nbytes`` of GPU memory."""

    _allocate, _release = "cudaMalloc", "cudaFree"


class PinnedArray(_Allocation):
    """A numpy array in page-locked host memory (``.array``), so copies to and from the GPU run
    asynchronously at full bus speed."""

    _allocate, _release = "cudaMallocHost", "cudaFreeHost"

    def __init__(self, runtime: CudaRuntime, shape: tuple[int, ...], dtype=np.float32):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        super().__init__(runtime, int(np.prod(self.shape)) * self.dtype.itemsize)
        raw = (ctypes.c_byte * self.nbytes).from_address(self.address)
        self.array = np.frombuffer(raw, dtype=self.dtype).reshape(self.shape)

    def free(self) -> None:
        self.array = None  # no view of freed memory stays reachable
        super().free()
