import t from 'tap';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { UndoJournal, parseUndo, readUndoFile, UNDO_HEADER_BYTES, UNDO_MAGIC, UNDO_UNIT } from '../../../src/target/local/undo-journal.js';
import { tmpDir } from '../../helpers.js';

const BS = 4096;

const units = (j: UndoJournal) => [...j.captured].sort((a, b) => a - b);

/** Three records: data, all-zero data (stored as a flag), data. */
function sample(): { offset: number; length: number; data: Buffer | null }[] {
  return [
    { offset: 0, length: BS, data: randomBytes(BS) },
    { offset: 3 * BS, length: BS, data: Buffer.alloc(BS) },
    { offset: 7 * BS, length: 2 * BS, data: randomBytes(2 * BS) },
  ];
}

t.test('undo journal: records round trip (offset, old bytes, zero flag), mode 0600, captured set', async (t) => {
  const dir = await tmpDir(t);
  const file = path.join(dir, 'rp-000001.undo');
  const j = await UndoJournal.open(file);
  t.equal(j.bytes, 0, 'a new journal is empty');
  t.equal(j.captured.size, 0);
  await j.append([]);
  t.equal((await fsp.stat(file)).size, 0, 'appending nothing writes nothing');
  const recs = sample();
  await j.append(recs.slice(0, 2));
  await j.append([recs[2], { offset: 11 * BS, length: BS, data: null }]);
  const expectBytes = 4 * UNDO_HEADER_BYTES + BS + 2 * BS; // zero records carry no data
  t.equal(j.bytes, expectBytes, 'size counts headers and non-zero data only');
  t.equal((await fsp.stat(file)).size, expectBytes, 'file size matches');
  t.equal((await fsp.stat(file)).mode & 0o777, 0o600, 'undo file is 0600');
  t.equal(UNDO_UNIT, 4096, 'captured counts 4 KiB units');
  t.same(units(j), [0, 3, 7, 8, 11], 'captured holds every 4 KiB unit the appended records cover (the 8 KiB record at unit 7 covers 7 and 8)');
  await j.close();

  const buf = await fsp.readFile(file);
  t.equal(buf.readUInt32BE(0), UNDO_MAGIC, 'record starts with the magic');
  const { records, validBytes } = parseUndo(buf);
  t.equal(validBytes, buf.length, 'whole file is valid');
  t.equal(records.length, 4);
  t.same(records.map((r) => [r.offset, r.length]), [[0, BS], [3 * BS, BS], [7 * BS, 2 * BS], [11 * BS, BS]]);
  t.ok(records[0].data && records[0].data.equals(recs[0].data!), 'old bytes of record 0 round trip');
  t.equal(records[1].data, null, 'all-zero old bytes are stored as the zero flag');
  t.ok(records[2].data && records[2].data.equals(recs[2].data!), 'old bytes of record 2 round trip');
  t.equal(records[3].data, null, 'null data is a zero record');
  const viaFile = await readUndoFile(file);
  t.same(viaFile.map((r) => [r.offset, r.length, r.data ? r.data.toString('hex') : null]), records.map((r) => [r.offset, r.length, r.data ? r.data.toString('hex') : null]));
  t.same(await readUndoFile(path.join(dir, 'missing.undo')), [], 'a missing undo file has no records');
});

t.test('undo journal: large offsets (> 4 GiB) round trip', async (t) => {
  const dir = await tmpDir(t);
  const file = path.join(dir, 'big.undo');
  const j = await UndoJournal.open(file);
  const off = 6 * 1024 * 1024 * 1024 + 8192;
  const data = randomBytes(512);
  await j.append([{ offset: off, length: 512, data }]);
  await j.close();
  const recs = await readUndoFile(file);
  t.equal(recs.length, 1);
  t.equal(recs[0].offset, off);
  t.ok(recs[0].data!.equals(data));
  const r = await UndoJournal.open(file);
  t.same(units(r), [off / UNDO_UNIT], 'a 512-byte record marks the unit it lies in');
  await r.close();
});

t.test('undo journal: captured is a set of 4 KiB units, whatever the records\' offsets and lengths', async (t) => {
  const dir = await tmpDir(t);
  const file = path.join(dir, 'u.undo');
  const j = await UndoJournal.open(file);
  const K64 = 64 * 1024;
  await j.append([{ offset: 0, length: K64, data: randomBytes(K64) }]);
  t.same(units(j), Array.from({ length: 16 }, (_, i) => i), 'a 64 KiB record covers units 0..15');
  // a longer record at the same offset adds only the units it covers beyond the first
  await j.append([{ offset: K64, length: K64, data: null }]);
  t.same(units(j), Array.from({ length: 32 }, (_, i) => i), 'units 16..31 added');
  // a record that starts and ends inside units marks every unit it touches
  await j.append([{ offset: 40 * UNDO_UNIT + 512, length: UNDO_UNIT, data: randomBytes(UNDO_UNIT) }]);
  t.ok(j.captured.has(40) && j.captured.has(41), 'an unaligned 4 KiB record touches units 40 and 41');
  t.notOk(j.captured.has(39) || j.captured.has(42), 'and no unit beside them');
  t.equal(j.captured.size, 34);
  // markCaptured on its own (no record written) follows the same rule
  j.markCaptured(100 * UNDO_UNIT - 1, 2);
  t.ok(j.captured.has(99) && j.captured.has(100), 'two bytes straddling a unit boundary mark both units');
  j.markCaptured(200 * UNDO_UNIT, 0);
  t.notOk(j.captured.has(200), 'an empty range marks nothing');
  t.equal(j.captured.size, 36);
  await j.close();
  const r = await UndoJournal.open(file);
  t.same(units(r), [...Array.from({ length: 32 }, (_, i) => i), 40, 41], 'reopen rebuilds the same units from the records');
  await r.close();
});

t.test('undo journal: reopening restores captured and appends after the existing records', async (t) => {
  const dir = await tmpDir(t);
  const file = path.join(dir, 'e.undo');
  const j = await UndoJournal.open(file);
  const recs = sample();
  await j.append(recs);
  const size = j.bytes;
  await j.close();
  const j2 = await UndoJournal.open(file);
  t.equal(j2.bytes, size, 'size restored');
  t.same(units(j2), [0, 3, 7, 8], 'captured units restored from the file');
  const more = { offset: 20 * BS, length: BS, data: randomBytes(BS) };
  await j2.append([more]);
  await j2.close();
  const all = await readUndoFile(file);
  t.equal(all.length, 4, 'new record appended after the old ones');
  t.equal(all[3].offset, 20 * BS);
  t.ok(all[3].data!.equals(more.data));
  t.ok(all[0].data!.equals(recs[0].data!), 'older records intact');
});

t.test('undo journal: a torn tail is cut on open, complete records are kept', async (t) => {
  const dir = await tmpDir(t);
  const file = path.join(dir, 't.undo');
  const j = await UndoJournal.open(file);
  const recs = sample();
  await j.append(recs);
  await j.close();
  const full = await fsp.readFile(file);
  const twoRecs = 2 * UNDO_HEADER_BYTES + BS; // record 0 (header + data) + record 1 (zero: header only)
  t.equal(full.length, twoRecs + UNDO_HEADER_BYTES + 2 * BS);

  // cut inside the third record's data, inside its header, one byte into it, and one byte short of the end
  for (const cut of [twoRecs + UNDO_HEADER_BYTES + 100, twoRecs + 17, twoRecs + 1, full.length - 1]) {
    await fsp.writeFile(file, full.subarray(0, cut));
    const p = parseUndo(await fsp.readFile(file));
    t.equal(p.records.length, 2, `parse of a tail torn at ${cut}: two complete records`);
    t.equal(p.validBytes, twoRecs, `validBytes stops before the torn record (cut ${cut})`);
    const r = await UndoJournal.open(file);
    t.equal(r.bytes, twoRecs, `open cuts the torn tail (cut ${cut})`);
    t.equal((await fsp.stat(file)).size, twoRecs, 'file truncated to the intact prefix');
    t.same(units(r), [0, 3], 'the torn record is not captured (neither of its units)');
    // appending after the cut produces a clean file again
    await r.append([recs[2]]);
    await r.close();
    const again = await readUndoFile(file);
    t.equal(again.length, 3, 'append after the cut is readable');
    t.ok(again[2].data!.equals(recs[2].data!));
    t.ok(again[0].data!.equals(recs[0].data!));
  }

  // a cut inside the first record's header leaves nothing
  await fsp.writeFile(file, full.subarray(0, 10));
  const empty = await UndoJournal.open(file);
  t.equal(empty.bytes, 0);
  t.equal(empty.captured.size, 0);
  t.equal((await fsp.stat(file)).size, 0);
  await empty.close();
});

t.test('undo journal: corruption stops parsing at the damaged record (checked by data and header checksums)', async (t) => {
  const dir = await tmpDir(t);
  const file = path.join(dir, 'c.undo');
  const j = await UndoJournal.open(file);
  const recs = sample();
  await j.append(recs);
  await j.close();
  const full = await fsp.readFile(file);
  const rec0 = UNDO_HEADER_BYTES + BS;
  const rec2 = rec0 + UNDO_HEADER_BYTES; // start of the third record (record 1 is a zero record)

  const cases: [string, number, number][] = [
    // [what, byte to flip, records expected before it]
    ['a data byte of record 0', UNDO_HEADER_BYTES + 5, 0],
    ['the offset field of record 0', 9, 0],
    ['the magic of record 0', 0, 0],
    ['the header checksum of record 1', rec0 + 33, 1],
    ['the zero flag of record 1', rec0 + 7, 1],
    ['the data checksum of record 2', rec2 + 25, 2],
    ['a data byte of record 2', rec2 + UNDO_HEADER_BYTES + 2 * BS - 1, 2],
  ];
  for (const [what, at, keep] of cases) {
    const bad = Buffer.from(full);
    bad[at] ^= 0x01;
    const p = parseUndo(bad);
    t.equal(p.records.length, keep, `flipping ${what}: ${keep} intact records`);
    t.equal(p.validBytes, [0, rec0, rec2][keep], `flipping ${what}: validBytes stops at the damaged record`);
    for (const r of p.records) {
      const orig = recs.find((x) => x.offset === r.offset)!;
      t.ok(r.data === null ? orig.data!.every((b) => b === 0) : r.data.equals(orig.data!), 'records before the damage are intact');
    }
    await fsp.writeFile(file, bad);
    t.equal((await readUndoFile(file)).length, keep, `readUndoFile returns only the intact prefix (${what})`);
    const o = await UndoJournal.open(file);
    t.equal((await fsp.stat(file)).size, p.validBytes, `open cuts the file at the damaged record (${what})`);
    t.same(units(o), [[], [0], [0, 3]][keep], `captured holds the units of the intact records only (${what})`);
    await o.close();
  }
});

t.test('undo journal: parseUndo of garbage and of an empty buffer', async (t) => {
  t.same(parseUndo(Buffer.alloc(0)), { records: [], validBytes: 0 });
  t.same(parseUndo(Buffer.alloc(1000)), { records: [], validBytes: 0 }, 'zeros are not records');
  const junk = randomBytes(4096);
  junk.writeUInt32BE(UNDO_MAGIC, 0); // right magic, wrong header checksum
  t.equal(parseUndo(junk).records.length, 0);
});
