"""Before each (re)start: is the checkpoint `--c` will load readable? If not, move it aside and fall back.

How it works, without importing torch into the long-running supervisor: torch.save writes a zip archive
(`<name>/data.pkl`, `<name>/data/0`, ...). `verify` opens it with zipfile, which needs an intact central
directory (a truncated file fails here, exactly where torch.load fails with "PytorchStreamReader failed
finding central directory"), and requires a data.pkl entry. An intact directory is not enough: torch.save
writes the directory in its writer's `__exit__`, so a save interrupted by SIGINT (or a crash) leaves a
valid zip that lacks the storages not yet written, and torch.load then fails with "PytorchStreamReader
failed locating file data/101". So `verify` walks data.pkl with `InertUnpickler` (the project's one inert unpickler,
also used by pack to read a checkpoint's epoch and EMA), which never imports or calls anything real, and records each persistent id ('storage', type, key, location, numel) torch writes for a tensor's
storage; each `<name>/data/<key>` must exist with at least numel x element size bytes (the size where the
storage type is known). It CRC-checks every entry (testzip) first, which catches flipped or zeroed bytes:
what fails after that is the verifier's limit, not damage, and never moves a checkpoint aside.

Which checkpoint `--c` resumes from, and which are moved aside, is the policy's decision
(criteria.choose_resume over what `verify` found); `stale_temp_files` lists the temp files a killed
atomic writer left behind (config/job.py's CHECKPOINT_TEMP name, its pid no longer alive), which the
policy has removed.
"""
from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

from supervisor.config.job import CHECKPOINT_TEMP
from supervisor.core.known_bad import pickled_under_numpy2


# torch's storage classes as named in a checkpoint's pickle -> bytes per element (torch 2.x's
# _dtype_to_storage_type_map; UntypedStorage counts bytes). Others (newer dtypes) are checked for presence.
_ELEMENT_SIZE = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2, "LongStorage": 8,
    "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1, "BoolStorage": 1,
    "ComplexDoubleStorage": 16, "ComplexFloatStorage": 8, "QInt8Storage": 1, "QInt32Storage": 4,
    "QUInt8Storage": 1, "QUInt4x2Storage": 1, "QUInt2x4Storage": 1, "UntypedStorage": 1,
}
MAX_PICKLE_BYTES = 256 << 20  # nnU-Net's data.pkl is well under 1 MiB (tensors live in data/N)


class Stub:
    """Stands for any class or function a pickle names: accepts every call and every state, and remembers
    the arguments it was made with (a numpy dtype's code is read from them)."""

    qualname = ""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.args = args

    def __call__(self, *args, **kwargs):
        return Stub(*args)

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


class _Dtype(Stub):
    qualname = "numpy.dtype"


# numpy's dtype codes (the last two characters of '<f8', 'f4', ...) -> struct formats, for numpy scalars
_STRUCT = {"f8": "d", "f4": "f", "f2": "e", "i8": "q", "i4": "i", "i2": "h", "i1": "b", "u8": "Q",
           "u4": "I", "u2": "H", "u1": "B", "b1": "?"}


def _scalar(dtype, data=b"", *rest):
    """numpy.core.multiarray.scalar(dtype, bytes) without numpy: the number, or a Stub when not plain."""
    code = dtype.args[0] if isinstance(dtype, _Dtype) and dtype.args else None
    fmt = _STRUCT.get(str(code)[-2:]) if code else None
    if fmt and isinstance(data, (bytes, bytearray)) and len(data) == struct.calcsize(fmt):
        return struct.unpack("<" + fmt, data)[0]
    return Stub(dtype, data)


class InertUnpickler(pickle.Unpickler):
    """The project's one way to read a torch checkpoint's data.pkl without torch: it never imports or calls
    anything real (every global is an inert Stub class; nothing in the pickle can run code). Plain values
    come out as they are, numpy scalars as Python numbers (so an epoch or an EMA can be read), tensors as
    stubs. What it saw is kept: `modules` (the modules the pickle names: numpy._core means pickled under
    numpy 2) and `storages` ((storage class name, key, numel) per persistent id torch wrote for a tensor)."""

    def __init__(self, fh):
        super().__init__(fh)
        self.modules: set[str] = set()
        self.storages: list[tuple[str, str, object]] = []
        self._stubs: dict[tuple[str, str], type] = {}

    def find_class(self, module, name):
        key = (str(module), str(name))
        self.modules.add(key[0])
        if key[0] in ("numpy.core.multiarray", "numpy._core.multiarray") and key[1] == "scalar":
            return _scalar
        if key == ("numpy", "dtype"):
            return _Dtype
        if key == ("_codecs", "encode"):
            return lambda s, enc="utf-8": str(s).encode(enc)
        if key == ("torch", "device"):
            return lambda *a: ":".join(str(x) for x in a)
        if key not in self._stubs:
            self._stubs[key] = type("Stub", (Stub,), {"qualname": f"{key[0]}.{key[1]}"})
        return self._stubs[key]

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage":
            kind = getattr(pid[1], "qualname", "").rpartition(".")[2]
            self.storages.append((kind, str(pid[2]), pid[4]))
        return Stub()


def _missing_storage(z: zipfile.ZipFile, pkl: str) -> str | None:
    """What data.pkl (whose bytes passed the CRC check) refers to that the archive lacks, or None. A pickle
    stream that is malformed (cut short, not a pickle) is damage any unpickler refuses; any other error is
    the inert unpickler's own limit and raises: the caller does not judge the file then."""
    collector = InertUnpickler(z.open(pkl))
    try:
        collector.load()
    except (pickle.UnpicklingError, EOFError) as e:
        return f"{pkl} does not unpickle ({type(e).__name__}: {e})"
    prefix = pkl[: -len("data.pkl")]
    sizes = {i.filename: i.file_size for i in z.infolist()}
    for kind, key, numel in collector.storages:
        name = f"{prefix}data/{key}"
        if name not in sizes:
            return f"{name} is missing (the checkpoint was cut off while being written)"
        need = numel * _ELEMENT_SIZE[kind] if kind in _ELEMENT_SIZE and isinstance(numel, int) else 0
        if sizes[name] < need:
            return f"{name} holds {sizes[name]} bytes, its {kind} needs {need}"
    return None


def verify(path: Path) -> str | None:
    """None when the checkpoint is a complete torch archive, else what is wrong with it.

    Only a known form of damage is a verdict (a checkpoint judged damaged is moved aside): an archive
    zipfile cannot read, a CRC mismatch, a missing or short storage. The archive is read and CRC-checked
    first, by zipfile; once every byte is as its writer wrote it, anything else going wrong is the
    verifier's own limit or bug (a pickle it cannot follow, a torch version it does not know), never a
    reason to move a good checkpoint away: the answer is then None, and torch.load has the last word."""
    try:
        with zipfile.ZipFile(path) as z:
            pkls = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if not pkls:
                return "no data.pkl in the archive (not a torch checkpoint)"
            bad = z.testzip()
            if bad is not None:
                return f"CRC mismatch in {bad}"
            info = z.getinfo(pkls[0])
            if info.file_size > MAX_PICKLE_BYTES:
                return f"{pkls[0]} is {info.file_size} bytes, more than a checkpoint's pickle holds"
            try:
                return _missing_storage(z, pkls[0])
            except Exception:  # noqa: BLE001 - ours, not the file's: see the docstring
                return None
    except zipfile.BadZipFile as e:
        return f"not a complete zip archive ({e})"
    except (OSError, EOFError, ValueError, RuntimeError, KeyError, NotImplementedError, zlib.error) as e:
        return f"unreadable ({e})"  # zipfile on a hostile archive: bad compression method, bad deflate data, ...


def _num(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def read_checkpoint(fileobj) -> dict:
    """{epoch, ema, best_ema, trainer, device, numpy2_pickle} from a torch checkpoint (path or open binary
    file, positioned anywhere), read with InertUnpickler (numpy scalars come out as numbers); raises
    ValueError when it is not one. numpy2_pickle: the pickle names numpy._core (core/known_bad.py: written
    under numpy 2, which numpy 1 cannot load). pack records it per fold, `run` and `check` judge it."""
    try:
        with zipfile.ZipFile(fileobj) as z:
            pkls = [n for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if not pkls:
                raise ValueError("no data.pkl (not a torch checkpoint)")
            if z.getinfo(pkls[0]).file_size > MAX_PICKLE_BYTES:
                raise ValueError(f"{pkls[0]} is larger than a checkpoint's pickle")
            reader = InertUnpickler(io.BytesIO(z.read(pkls[0])))
            doc = reader.load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, OSError, KeyError, zlib.error) as e:
        raise ValueError(str(e)) from None
    if not isinstance(doc, dict):
        raise ValueError("its pickle is not a dict (not an nnU-Net checkpoint)")
    logging = doc.get("logging") if isinstance(doc.get("logging"), dict) else {}
    emas = logging.get("ema_fg_dice") if isinstance(logging.get("ema_fg_dice"), list) else []
    init = doc.get("init_args") if isinstance(doc.get("init_args"), dict) else {}
    epoch = doc.get("current_epoch")
    return {"epoch": epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None,
            "ema": _num(emas[-1]) if emas else None, "best_ema": _num(doc.get("_best_ema")),
            "trainer": doc.get("trainer_name") if isinstance(doc.get("trainer_name"), str) else None,
            "device": init.get("device") if isinstance(init.get("device"), str) else None,
            "numpy2_pickle": pickled_under_numpy2(reader.modules)}


def stale_temp_files(fold: Path) -> list[str]:
    """Temp files the launcher's atomic checkpoint writer left when it was killed (its pid is gone): ours to
    remove. A temp file whose writer still runs is being written and is left alone."""
    out = []
    try:
        entries = list(fold.iterdir())
    except OSError:
        return out
    for p in entries:
        m = CHECKPOINT_TEMP.match(p.name)
        if not m:
            continue
        try:
            os.kill(int(m.group(2)), 0)
            continue  # its writer is still alive
        except ProcessLookupError:
            out.append(p.name)
        except (PermissionError, OverflowError):
            continue
    return sorted(out)
