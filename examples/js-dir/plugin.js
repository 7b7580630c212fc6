// js-dir: a gocp cache backend in JavaScript, keeping entries and bodies in a
// directory.
//
// Layout under its root (`/state` unless `path` says otherwise):
// - `entries/<2 hex>/<64 hex action id>`: one line,
//   `v2 <output hex> <size> <put time ns> <host data hex, or - when empty>`
//   (the format of the shipped Rust plugins, so a directory can change hands;
//   `v1` lines, without host data, are still read).
// - `bodies/<2 hex>/<64 hex output id>`: the body.
//
// Every file appears by renaming a complete temporary file in the same
// directory, so any number of instances and go commands can share the root
// without locks. This module owns only that directory: it must never touch
// anything outside it, and never leave a partial file under a final name. It
// does not trim: an example keeps to the contract, a production plugin would
// also expire old files in `finish` (see plugins/disk).
//
// Conventions of componentize-js that shape this file: the export is an object
// named after the WIT interface (`backend`); u64 values are BigInts and digests
// Uint8Arrays; an `err` result is returned by throwing a plain object such as
// `{ tag: 'not-found' }` (throwing an Error traps instead); an imported call
// that fails throws an Error whose `payload` is the WIT error (a filesystem
// error code such as 'no-entry', a stream error such as `{ tag: 'closed' }`).

import { getDirectories } from 'wasi:filesystem/preopens@0.2.12';

const VERSION = '0.1.0';
const STATE_DIR = '/state';
// Large enough that an 8 MiB body takes a handful of calls.
const CHUNK = 1n << 20n;
// The contract's bound on an entry's host data, and more than the longest
// entry line that allows.
const MAX_HOST_DATA = 1024;
const MAX_ENTRY_LINE = 4096n;
const dispose = Symbol.dispose || Symbol.for('dispose');

// Set by `open`: the preopened directory holding the root, and the root's path
// relative to it ('' or ending in '/'). Each instance has its own copy.
let dir = null;
let prefix = '';

const notFound = () => ({ tag: 'not-found' });
const broken = (message) => ({ tag: 'broken', val: message });
const invalidConfig = (message) => ({ tag: 'invalid-config', val: message });

// The WIT error of a failed import call, or the exception itself.
const payload = (e) => (e && Object.prototype.hasOwnProperty.call(e, 'payload') ? e.payload : e);
const describeError = (e) => {
  const p = payload(e);
  return typeof p === 'string' ? p : p && p.tag ? p.tag : String(e);
};

function hex(bytes) {
  let s = '';
  for (const b of bytes) s += b.toString(16).padStart(2, '0');
  return s;
}

// The bytes of lower-case hex digits, or null for anything else.
function fromHex(s) {
  if (!/^([0-9a-f]{2})*$/.test(s)) return null;
  const out = new Uint8Array(s.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(s.slice(2 * i, 2 * i + 2), 16);
  return out;
}

function entryLine(entry) {
  const hostData = entry.hostData.length ? hex(entry.hostData) : '-';
  return `v2 ${hex(entry.outputId)} ${entry.size} ${entry.putTimeNs} ${hostData}\n`;
}

// The last field of a v2 line: '-', or the hex of at most MAX_HOST_DATA bytes.
function parseHostData(field) {
  if (field === '-') return new Uint8Array(0);
  const bytes = field ? fromHex(field) : null;
  return bytes && bytes.length <= MAX_HOST_DATA ? bytes : null;
}

// The entry a line holds, or null if it is not one.
function parseEntry(text) {
  const fields = text.trim().split(' ');
  const hostData =
    fields.length === 4 && fields[0] === 'v1'
      ? new Uint8Array(0)
      : fields.length === 5 && fields[0] === 'v2'
        ? parseHostData(fields[4])
        : null;
  const outputId = hostData && fields[1].length === 64 ? fromHex(fields[1]) : null;
  if (!outputId || !/^\d+$/.test(fields[2]) || !/^\d+$/.test(fields[3])) return null;
  return { outputId, size: BigInt(fields[2]), putTimeNs: BigInt(fields[3]), hostData };
}

const entryPath = (actionId) => {
  const h = hex(actionId);
  return `${prefix}entries/${h.slice(0, 2)}/${h}`;
};

const bodyPath = (outputId) => {
  const h = hex(outputId);
  return `${prefix}bodies/${h.slice(0, 2)}/${h}`;
};

// Resources this module opened are released at once rather than whenever the
// garbage collector gets to them: each holds a host file handle.
function using(resource, use) {
  try {
    return use(resource);
  } finally {
    resource[dispose]();
  }
}

function mkdirs(path) {
  let at = '';
  for (const part of path.split('/').filter((p) => p)) {
    at += (at ? '/' : '') + part;
    try {
      dir.createDirectoryAt(at);
    } catch (e) {
      if (payload(e) !== 'exist') throw e;
    }
  }
}

// Creates a fresh temporary file next to `final` (creating its shard directory
// on first use), lets `fill` write it, and renames it into place.
function writeAtomically(final, fill) {
  const random = new Uint8Array(8);
  // Random, not a counter: several instances write into the same directory.
  crypto.getRandomValues(random);
  const tmp = `${final.slice(0, final.lastIndexOf('/'))}/.tmp-${hex(random)}`;
  let file;
  const create = () => dir.openAt({}, tmp, { create: true, exclusive: true }, { write: true });
  try {
    try {
      file = create();
    } catch (e) {
      if (payload(e) !== 'no-entry') throw e;
      mkdirs(final.slice(0, final.lastIndexOf('/')));
      file = create();
    }
  } catch (e) {
    throw broken(`creating ${tmp}: ${describeError(e)}`);
  }
  try {
    using(file, fill);
    dir.renameAt(tmp, dir, final);
  } catch (e) {
    try {
      dir.unlinkFileAt(tmp);
    } catch {
      // Already gone, or the disk is failing: the error below says so.
    }
    throw e.tag ? e : broken(`writing ${final}: ${describeError(e)}`);
  }
}

// Moves everything from `src` into `dst` (both wasi:io streams) without the
// bytes passing through JavaScript; returns how many bytes moved.
function pump(src, dst) {
  let total = 0n;
  for (;;) {
    try {
      total += dst.blockingSplice(src, CHUNK);
    } catch (e) {
      const p = payload(e);
      if (p && p.tag === 'closed') return total;
      throw e;
    }
  }
}

export const backend = {
  describe() {
    return {
      name: 'js-dir',
      version: VERSION,
      summary: 'example in JavaScript: entries and bodies in a directory',
      // Everything lives in files, so any number of instances may share it.
      maxInstances: 0,
      configKeys: [
        {
          name: 'path',
          help: 'directory to keep the cache in, as the plugin sees it (default /state; grant others with --allow-dir)',
        },
      ],
    };
  },

  open(config) {
    let root = STATE_DIR;
    for (const [key, value] of config) {
      if (key !== 'path') throw invalidConfig(`unknown configuration key: ${key} (js-dir knows only path)`);
      root = value;
    }
    // The longest granted directory that holds the root.
    let best = null;
    for (const [descriptor, guest] of getDirectories()) {
      const base = guest.endsWith('/') ? guest : `${guest}/`;
      if ((root === guest || root.startsWith(base)) && (!best || guest.length > best[1].length)) {
        best = [descriptor, guest];
      }
    }
    if (!best) throw invalidConfig(`path=${root}: not inside a granted directory (grant one with --allow-dir)`);
    dir = best[0];
    const rest = root.slice(best[1].length).replace(/^\/+|\/+$/g, '');
    prefix = rest ? `${rest}/` : '';
    try {
      mkdirs(`${prefix}entries`);
      mkdirs(`${prefix}bodies`);
    } catch (e) {
      throw invalidConfig(`path=${root}: cannot create a directory there (${describeError(e)})`);
    }
    return { storesBodies: true };
  },

  readEntry(actionId) {
    const path = entryPath(actionId);
    let text;
    try {
      text = using(dir.openAt({}, path, {}, { read: true }), (f) =>
        new TextDecoder().decode(f.read(MAX_ENTRY_LINE, 0n)[0]),
      );
    } catch (e) {
      if (payload(e) === 'no-entry') throw notFound();
      throw broken(`reading ${path}: ${describeError(e)}`);
    }
    const entry = parseEntry(text);
    if (!entry) throw broken(`${path}: not an entry line (remove the file to forget it)`);
    return entry;
  },

  writeEntry(actionId, entry) {
    if (entry.hostData.length > MAX_HOST_DATA) {
      throw broken(`${entry.hostData.length} bytes of host data, more than the contract's ${MAX_HOST_DATA}`);
    }
    const line = new TextEncoder().encode(entryLine(entry));
    writeAtomically(entryPath(actionId), (f) => {
      let written = 0n;
      while (written < BigInt(line.length)) written += f.write(line.subarray(Number(written)), written);
    });
  },

  readBody(outputId, size, sink) {
    const path = bodyPath(outputId);
    let file;
    try {
      file = dir.openAt({}, path, {}, { read: true });
    } catch (e) {
      if (payload(e) === 'no-entry') throw notFound();
      throw broken(`opening ${path}: ${describeError(e)}`);
    }
    let moved;
    try {
      moved = using(file, (f) => using(f.readViaStream(0n), (src) => pump(src, sink)));
    } catch (e) {
      throw { tag: 'unavailable', val: `sending ${path} to the host: ${describeError(e)}` };
    }
    if (moved !== size) throw broken(`${path} holds ${moved} bytes, the entry says ${size}`);
  },

  writeBody(outputId, size, body) {
    const final = bodyPath(outputId);
    try {
      dir.statAt({}, final);
      // Bodies never change: the one already here is this one.
      return;
    } catch (e) {
      if (payload(e) !== 'no-entry') throw broken(`looking at ${final}: ${describeError(e)}`);
    }
    writeAtomically(final, (f) => {
      const moved = using(f.writeViaStream(0n), (out) => {
        const n = pump(body, out);
        out.blockingFlush();
        return n;
      });
      if (moved !== size) throw broken(`the host sent ${moved} bytes for a body of ${size}`);
    });
  },

  finish() {},
};
