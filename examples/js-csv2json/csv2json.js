// A JavaScript plugin for Bulkhead: turns /in/data.csv into /out/data.json.
//
// Built with componentize-js into a `wasi:cli/command` component (no
// wasi:http: the policy grants no service):
//
//   componentize-js csv2json.js --wit wit --world-name command \
//     --disable http fetch-event -o js-csv2json.wasm
//
// The first CSV line names the columns; every other line becomes an object
// (quoted fields with "" escapes and commas inside; numbers stay strings
// unless `--numbers=yes`). It reads and writes through wasi:filesystem, the
// only file API a componentize-js guest has.
import { getArguments } from 'wasi:cli/environment@0.2.12';
import { getDirectories } from 'wasi:filesystem/preopens@0.2.12';

function preopen(path) {
  const found = getDirectories().find(([, p]) => p === path);
  if (!found) throw new Error(`no ${path} directory`);
  return found[0];
}

function readFile(dir, name) {
  const file = dir.openAt({}, name, {}, { read: true });
  const chunks = [];
  let offset = 0n;
  for (;;) {
    const [bytes, end] = file.read(65536n, offset);
    chunks.push(bytes);
    offset += BigInt(bytes.length);
    if (end || bytes.length === 0) break;
  }
  const all = new Uint8Array(Number(offset));
  let at = 0;
  for (const c of chunks) {
    all.set(c, at);
    at += c.length;
  }
  return new TextDecoder().decode(all);
}

function writeFile(dir, name, text) {
  const bytes = new TextEncoder().encode(text);
  const file = dir.openAt({}, name, { create: true, truncate: true }, { write: true });
  let offset = 0;
  while (offset < bytes.length) {
    offset += Number(file.write(bytes.subarray(offset), BigInt(offset)));
  }
}

// One CSV record per call: fields, quoted or not; returns [fields, next].
function record(text, at) {
  const fields = [];
  let field = '';
  let quoted = false;
  for (; at < text.length; at++) {
    const c = text[at];
    if (quoted) {
      if (c === '"' && text[at + 1] === '"') {
        field += '"';
        at++;
      } else if (c === '"') {
        quoted = false;
      } else {
        field += c;
      }
    } else if (c === '"') {
      quoted = true;
    } else if (c === ',') {
      fields.push(field);
      field = '';
    } else if (c === '\n' || c === '\r') {
      if (c === '\r' && text[at + 1] === '\n') at++;
      at++;
      break;
    } else {
      field += c;
    }
  }
  if (quoted) throw new Error('unterminated quoted field');
  fields.push(field);
  return [fields, at];
}

function convert(text, numbers) {
  const rows = [];
  let [header, at] = record(text, 0);
  while (at < text.length) {
    const [fields, next] = record(text, at);
    at = next;
    if (fields.length === 1 && fields[0] === '') continue;
    if (fields.length !== header.length) {
      throw new Error(`row ${rows.length + 1} has ${fields.length} fields, the header ${header.length}`);
    }
    const row = {};
    header.forEach((name, i) => {
      const v = fields[i];
      row[name] = numbers && v !== '' && !Number.isNaN(Number(v)) ? Number(v) : v;
    });
    rows.push(row);
  }
  return rows;
}

export const run = {
  run() {
    let numbers = false;
    for (const arg of getArguments().slice(1)) {
      if (arg === '--numbers=yes') numbers = true;
      else if (arg !== '--numbers=no') throw new Error(`unknown argument ${arg}`);
    }
    const rows = convert(readFile(preopen('/in'), 'data.csv'), numbers);
    writeFile(preopen('/out'), 'data.json', JSON.stringify(rows, null, 1) + '\n');
    console.log(`js-csv2json: ${rows.length} rows`);
  },
};
