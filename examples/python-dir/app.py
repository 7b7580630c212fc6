"""python-dir: a gocp cache backend in Python, keeping entries and bodies in a directory.

Layout under its root (`/state` unless `path` says otherwise):
- `entries/<2 hex>/<64 hex action id>`: one line,
  `v2 <output hex> <size> <put time ns> <host data hex, or - when empty>`
  (the format of the shipped Rust plugins, so a directory can change hands;
  `v1` lines, without host data, are still read).
- `bodies/<2 hex>/<64 hex output id>`: the body.

Every file appears by renaming a complete temporary file in the same
directory, so any number of instances and go commands can share the root
without locks. This module owns only that directory: it must never read or
write anything outside it, and never leave a partial file under a final name.
It does not trim: an example keeps to the contract, a production plugin
would also expire old files in `finish` (see plugins/disk).

componentize-py runs this module's top level once, at build time, and may
make a new `Backend` object for every call: the state opened by `open` lives
in module globals, never in `self`.
"""

import os
import secrets

from componentize_py_types import Err
from wit_world import exports
from wit_world.imports import types
from wit_world.imports.streams import StreamError_Closed

VERSION = "0.1.0"
STATE_DIR = "/state"
# Large enough that an 8 MiB body takes a handful of calls, small enough to
# keep the interpreter's memory flat.
CHUNK = 1 << 20
# The contract's bound on an entry's host data, and more than the longest
# entry line that allows.
MAX_HOST_DATA = 1024
MAX_ENTRY_LINE = 4096

# Set by `open`; every instance has its own copy of the module.
_root = None


def _entry_path(action_id):
    h = action_id.hex()
    return os.path.join(_root, "entries", h[:2], h)


def _body_path(output_id):
    h = output_id.hex()
    return os.path.join(_root, "bodies", h[:2], h)


def _publish(tmp, final):
    """Renames a complete temporary file into place, removing it on failure."""
    try:
        os.rename(tmp, final)
    except OSError as e:
        _remove_quietly(tmp)
        raise Err(types.Error_Broken(f"renaming {tmp} to {final}: {e}"))


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass


def _temp_for(final):
    """A fresh temporary name next to `final`, creating its shard directory."""
    directory = os.path.dirname(final)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise Err(types.Error_Broken(f"creating {directory}: {e}"))
    # Random, not a counter: several instances write into the same directory.
    return os.path.join(directory, f".tmp-{secrets.token_hex(8)}")


def _entry_line(entry):
    host_data = entry.host_data.hex() if entry.host_data else "-"
    return f"v2 {entry.output_id.hex()} {entry.size} {entry.put_time_ns} {host_data}\n"


def _parse_entry(text):
    fields = text.split()
    if len(fields) == 4 and fields[0] == "v1":
        host_data = b""
    elif len(fields) == 5 and fields[0] == "v2":
        try:
            host_data = b"" if fields[4] == "-" else bytes.fromhex(fields[4])
        except ValueError:
            return None
        if len(host_data) > MAX_HOST_DATA:
            return None
    else:
        return None
    if len(fields[1]) != 64:
        return None
    try:
        return types.Entry(
            output_id=bytes.fromhex(fields[1]),
            size=int(fields[2]),
            put_time_ns=int(fields[3]),
            host_data=host_data,
        )
    except ValueError:
        return None


def _write_all(sink, data):
    """Writes `data` into a host output stream, as much as it grants at a time."""
    view = memoryview(data)
    while view:
        allowed = sink.check_write()
        if allowed == 0:
            # Waits until the host has room again, then asks anew.
            sink.blocking_flush()
            continue
        n = min(allowed, len(view))
        sink.write(bytes(view[:n]))
        view = view[n:]


class Backend(exports.Backend):
    def describe(self):
        return types.Info(
            name="python-dir",
            version=VERSION,
            summary="example in Python: entries and bodies in a directory",
            # Everything lives in files, so any number of instances may share it.
            max_instances=0,
            config_keys=[
                types.ConfigKey(
                    "path",
                    "directory to keep the cache in, as the plugin sees it "
                    "(default /state; grant others with --allow-dir)",
                )
            ],
        )

    def open(self, config):
        global _root
        root = STATE_DIR
        for key, value in config:
            if key == "path":
                root = value
            else:
                raise Err(types.Error_InvalidConfig(f"unknown configuration key: {key} (python-dir knows only path)"))
        try:
            os.makedirs(os.path.join(root, "entries"), exist_ok=True)
            os.makedirs(os.path.join(root, "bodies"), exist_ok=True)
        except OSError as e:
            raise Err(
                types.Error_InvalidConfig(
                    f"path={root}: cannot create a directory there ({e}); is it granted with --allow-dir?"
                )
            )
        _root = root
        return types.Capabilities(stores_bodies=True)

    def read_entry(self, action_id):
        path = _entry_path(action_id)
        try:
            # Binary and decoded by hand: componentize-py bundles only the
            # modules imported at build time, and text mode would look up a
            # codec at run time.
            with open(path, "rb") as f:
                text = f.read(MAX_ENTRY_LINE).decode()
        except FileNotFoundError:
            raise Err(types.Error_NotFound())
        except (OSError, UnicodeDecodeError) as e:
            raise Err(types.Error_Broken(f"reading {path}: {e}"))
        entry = _parse_entry(text)
        if entry is None:
            raise Err(types.Error_Broken(f"{path}: not an entry line (remove the file to forget it)"))
        return entry

    def write_entry(self, action_id, entry):
        if len(entry.host_data) > MAX_HOST_DATA:
            too_much = f"{len(entry.host_data)} bytes of host data, more than the contract's {MAX_HOST_DATA}"
            raise Err(types.Error_Broken(too_much))
        final = _entry_path(action_id)
        tmp = _temp_for(final)
        line = _entry_line(entry)
        try:
            with open(tmp, "xb") as f:
                f.write(line.encode())
        except OSError as e:
            _remove_quietly(tmp)
            raise Err(types.Error_Broken(f"writing {tmp}: {e}"))
        _publish(tmp, final)

    def read_body(self, output_id, size, sink):
        path = _body_path(output_id)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise Err(types.Error_NotFound())
        except OSError as e:
            raise Err(types.Error_Broken(f"opening {path}: {e}"))
        with f:
            try:
                while chunk := f.read(CHUNK):
                    _write_all(sink, chunk)
            except OSError as e:
                raise Err(types.Error_Broken(f"reading {path}: {e}"))
            except Err as e:
                raise Err(types.Error_Unavailable(f"writing {path} to the host: {e.value}"))

    def write_body(self, output_id, size, body):
        final = _body_path(output_id)
        if os.path.exists(final):
            # Bodies never change: the one already here is this one.
            return
        tmp = _temp_for(final)
        total = 0
        try:
            with open(tmp, "xb") as f:
                while True:
                    try:
                        chunk = body.blocking_read(CHUNK)
                    except Err as e:
                        if isinstance(e.value, StreamError_Closed):
                            break
                        raise Err(types.Error_Broken(f"reading the body from the host: {e.value}"))
                    f.write(chunk)
                    total += len(chunk)
        except OSError as e:
            _remove_quietly(tmp)
            raise Err(types.Error_Broken(f"writing {tmp}: {e}"))
        except Err:
            _remove_quietly(tmp)
            raise
        if total != size:
            _remove_quietly(tmp)
            raise Err(types.Error_Broken(f"the host sent {total} bytes for a body of {size}"))
        _publish(tmp, final)

    def finish(self):
        return None
