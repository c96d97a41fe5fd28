"""llama.cpp RPC workers (`ggml-rpc-server`) as devices of one model.

A registry entry's `rpc: [host:port, ...]` names workers; llama.cpp spreads the model's layers
over their devices as over local GPUs, and runs those layers there. The RPC protocol has no
authentication and no encryption: a worker must only ever be reachable from the server.

llama.cpp's RPC client aborts the whole process when it cannot connect to a worker
(`GGML_ABORT("Failed to connect ...")` in ggml-rpc.cpp), so each endpoint is first tried with a
plain TCP connection: an unreachable worker fails only that model's load. The workers' devices
are not added to ggml's global registry: a model gets them through its own device list, and
models without `rpc` never see them.
"""

from __future__ import annotations

import ctypes
import socket
from collections.abc import Sequence

import llama_cpp as lc

from server.engine.devices import Gpu, backend_library, describe
from server.errors import ModelLoadFailed

CONNECT_TIMEOUT_S = 5.0
_ADD_SERVER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)


def rpc_supported() -> bool:
    """Whether this llama.cpp was built with its RPC backend (GGML_RPC)."""
    return bool(lc.llama_supports_rpc())


def worker_devices(endpoints: Sequence[str], timeout: float = CONNECT_TIMEOUT_S) -> list[Gpu]:
    """The devices the rpc-server workers at `endpoints` offer, in order (blocking: it connects
    to each); ModelLoadFailed names a worker that cannot be reached."""
    if not rpc_supported():
        raise ModelLoadFailed(
            "field 'rpc': this llama.cpp was built without its RPC backend; reinstall "
            "llama-cpp-python with CMAKE_ARGS=\"-DGGML_RPC=ON\" (make does)")
    for endpoint in endpoints:
        _probe(endpoint, timeout)
    lib = backend_library()
    reg = lib.ggml_backend_reg_by_name(b"RPC")
    address = lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_rpc_add_server")
    if not reg or not address:
        raise ModelLoadFailed("field 'rpc': llama.cpp's RPC backend is not registered")
    add_server = _ADD_SERVER(address)
    found = []
    for endpoint in endpoints:
        server = add_server(endpoint.encode())
        if not server:
            raise ModelLoadFailed(f"field 'rpc': worker {endpoint} offers no devices")
        for index in range(lib.ggml_backend_reg_dev_count(server)):
            found.append(describe(lib, lib.ggml_backend_reg_dev_get(server, index)))
    return found


def _probe(endpoint: str, timeout: float) -> None:
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise ModelLoadFailed(f"field 'rpc': cannot reach the rpc-server worker at {endpoint}: "
                              f"{exc.strerror or exc}") from None
