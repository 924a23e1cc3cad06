/**
 * A strict reader of the Prometheus text exposition format (version 0.0.4), for tests: it
 * throws on anything a scraper could reject or misread, so a test that parses a server's
 * /metrics knows the output is well formed, not only that some line matched.
 *
 * Checked: HELP and TYPE lines (at most one each per family, TYPE before the family's samples,
 * a known type), metric and label names, label syntax and escapes, sample values, every sample
 * belonging to a declared family (counter and gauge: the family name; histogram: _bucket, _sum,
 * _count; summary: the name with a quantile label, _sum, _count), a family's samples
 * contiguous, no sample twice, counters not negative, and per histogram series: buckets with
 * increasing `le`, non-decreasing counts, a `+Inf` bucket equal to `_count`, and a `_sum`.
 */

export const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
export const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*$/;
const TYPES = new Set(['counter', 'gauge', 'histogram', 'summary', 'untyped']);

export interface Sample { name: string; labels: Record<string, string>; value: number }
export interface Family { name: string; type: string; help: string | null; samples: Sample[] }

export class ExpositionError extends Error {
  constructor(line: number, message: string) { super(`line ${line}: ${message}`); }
}

/** A sample value as Prometheus reads it (Go's ParseFloat: NaN and Inf in any case, e.g. prom-client's "Nan"). */
function parseValue(s: string): number {
  const l = s.toLowerCase();
  if (l === '+inf' || l === 'inf' || l === '+infinity' || l === 'infinity') return Infinity;
  if (l === '-inf' || l === '-infinity') return -Infinity;
  if (l === 'nan') return NaN;
  if (!/^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$/.test(s)) throw new Error(`bad value ${JSON.stringify(s)}`);
  return Number(s);
}

/** Parses `{a="x",b="y\"z"}` starting at text[0] === '{'; returns the labels and the rest. */
function parseLabels(text: string): { labels: Record<string, string>; rest: string } {
  const labels: Record<string, string> = {};
  let i = 1;
  for (;;) {
    while (text[i] === ' ') i++;
    if (text[i] === '}') return { labels, rest: text.slice(i + 1) };
    const m = /^[a-zA-Z_][a-zA-Z0-9_]*/.exec(text.slice(i));
    if (!m) throw new Error(`bad label name at ${JSON.stringify(text.slice(i, i + 20))}`);
    const name = m[0];
    if (name.startsWith('__')) throw new Error(`label name ${name} is reserved`);
    if (name in labels) throw new Error(`label ${name} given twice`);
    i += name.length;
    while (text[i] === ' ') i++;
    if (text[i] !== '=') throw new Error(`expected = after label ${name}`);
    i++;
    while (text[i] === ' ') i++;
    if (text[i] !== '"') throw new Error(`expected " to open the value of label ${name}`);
    i++;
    let v = '';
    for (;;) {
      const c = text[i];
      if (c === undefined) throw new Error(`unterminated value of label ${name}`);
      if (c === '"') { i++; break; }
      if (c === '\n') throw new Error(`raw newline in the value of label ${name}`);
      if (c === '\\') {
        const e = text[i + 1];
        if (e === '\\') v += '\\';
        else if (e === '"') v += '"';
        else if (e === 'n') v += '\n';
        else throw new Error(`bad escape \\${e ?? ''} in the value of label ${name}`);
        i += 2;
        continue;
      }
      v += c;
      i++;
    }
    labels[name] = v;
    while (text[i] === ' ') i++;
    if (text[i] === ',') { i++; continue; }
    if (text[i] === '}') return { labels, rest: text.slice(i + 1) };
    throw new Error(`expected , or } after label ${name}`);
  }
}

/** The family a sample name belongs to, given the declared families. */
function familyOf(name: string, families: Map<string, Family>): { family: Family; suffix: string } | null {
  const direct = families.get(name);
  if (direct && direct.type !== 'histogram') return { family: direct, suffix: '' };
  for (const suffix of ['_bucket', '_sum', '_count']) {
    if (!name.endsWith(suffix)) continue;
    const f = families.get(name.slice(0, -suffix.length));
    if (!f) continue;
    if (f.type === 'histogram' || (f.type === 'summary' && suffix !== '_bucket')) return { family: f, suffix };
  }
  return null;
}

function seriesKey(labels: Record<string, string>, omit?: string): string {
  return JSON.stringify(Object.entries(labels).filter(([k]) => k !== omit).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
}

/** Parses and checks an exposition (see the file comment); throws ExpositionError naming the line. */
export function parseExposition(text: string): Map<string, Family> {
  const families = new Map<string, Family>();
  const seen = new Set<string>();
  const typed = new Set<string>();
  const finished = new Set<string>();
  let current: string | null = null;
  const lines = text.split('\n');
  if (lines[lines.length - 1] === '') lines.pop();
  else if (text.length) throw new ExpositionError(lines.length, 'the exposition does not end with a newline');
  const declare = (n: number, name: string): Family => {
    if (!METRIC_NAME.test(name)) throw new ExpositionError(n, `bad metric name ${JSON.stringify(name)}`);
    let f = families.get(name);
    if (!f) families.set(name, (f = { name, type: 'untyped', help: null, samples: [] }));
    return f;
  };
  lines.forEach((raw, idx) => {
    const n = idx + 1;
    const line = raw.replace(/\r$/, '');
    if (line.trim() === '') return;
    if (line.startsWith('#')) {
      const m = /^#\s*(HELP|TYPE)\s+(\S+)(?:\s(.*))?$/.exec(line);
      if (!m) return; // a plain comment
      const f = declare(n, m[2]);
      if (m[1] === 'HELP') {
        if (f.help !== null) throw new ExpositionError(n, `second HELP for ${f.name}`);
        f.help = m[3] ?? '';
        if (/\\(?![\\n])/.test(f.help)) throw new ExpositionError(n, `bad escape in the HELP of ${f.name}`);
      } else {
        const type = (m[3] ?? '').trim();
        if (!TYPES.has(type)) throw new ExpositionError(n, `unknown type ${JSON.stringify(type)} for ${f.name}`);
        if (typed.has(f.name)) throw new ExpositionError(n, `second TYPE for ${f.name}`);
        if (f.samples.length) throw new ExpositionError(n, `TYPE of ${f.name} after its samples`);
        f.type = type;
        typed.add(f.name);
      }
      return;
    }
    const nm = /^[a-zA-Z_:][a-zA-Z0-9_:]*/.exec(line);
    if (!nm) throw new ExpositionError(n, `a sample line must start with a metric name: ${JSON.stringify(line.slice(0, 60))}`);
    const name = nm[0];
    let rest = line.slice(name.length);
    let labels: Record<string, string> = {};
    if (rest.startsWith('{')) {
      try {
        ({ labels, rest } = parseLabels(rest));
      } catch (err) {
        throw new ExpositionError(n, `${name}: ${(err as Error).message}`);
      }
    }
    const parts = rest.trim().split(/\s+/);
    if (!rest.startsWith(' ') || parts.length < 1 || parts.length > 2 || parts[0] === '') throw new ExpositionError(n, `${name}: expected " value [timestamp]", got ${JSON.stringify(rest)}`);
    let value: number;
    try { value = parseValue(parts[0]); } catch (err) { throw new ExpositionError(n, `${name}: ${(err as Error).message}`); }
    if (parts[1] !== undefined && !/^-?\d+$/.test(parts[1])) throw new ExpositionError(n, `${name}: bad timestamp ${parts[1]}`);
    const owner = familyOf(name, families);
    if (!owner) throw new ExpositionError(n, `sample ${name} belongs to no declared family`);
    const f = owner.family;
    if (current !== f.name) {
      if (finished.has(f.name)) throw new ExpositionError(n, `samples of ${f.name} are not contiguous`);
      if (current) finished.add(current);
      current = f.name;
    }
    const key = `${name}${seriesKey(labels)}`;
    if (seen.has(key)) throw new ExpositionError(n, `sample ${key} given twice`);
    seen.add(key);
    if (f.type === 'counter' && !(value >= 0)) throw new ExpositionError(n, `counter ${name} is ${value}`);
    if (f.type === 'histogram' && owner.suffix === '_bucket' && labels.le === undefined) throw new ExpositionError(n, `bucket of ${f.name} without le`);
    if (f.type === 'histogram' && owner.suffix !== '_bucket' && labels.le !== undefined) throw new ExpositionError(n, `${name} carries le`);
    if (f.type === 'summary' && owner.suffix === '' && labels.quantile === undefined) throw new ExpositionError(n, `summary ${name} without quantile`);
    f.samples.push({ name, labels, value });
  });
  for (const f of families.values()) {
    if (f.type !== 'histogram') continue;
    const series = new Map<string, { buckets: [number, number][]; sum?: number; count?: number }>();
    for (const s of f.samples) {
      const k = seriesKey(s.labels, 'le');
      let e = series.get(k);
      if (!e) series.set(k, (e = { buckets: [] }));
      if (s.name.endsWith('_bucket')) e.buckets.push([parseValue(s.labels.le), s.value]);
      else if (s.name.endsWith('_sum')) e.sum = s.value;
      else e.count = s.value;
    }
    for (const [k, e] of series) {
      const where = `histogram ${f.name}${k}`;
      if (e.count === undefined || e.sum === undefined) throw new ExpositionError(0, `${where} lacks _count or _sum`);
      if (!e.buckets.length) throw new ExpositionError(0, `${where} has no buckets`);
      for (let i = 1; i < e.buckets.length; i++) {
        if (!(e.buckets[i][0] > e.buckets[i - 1][0])) throw new ExpositionError(0, `${where}: le ${e.buckets[i][0]} does not follow ${e.buckets[i - 1][0]}`);
        if (e.buckets[i][1] < e.buckets[i - 1][1]) throw new ExpositionError(0, `${where}: bucket le=${e.buckets[i][0]} holds fewer than the one before`);
      }
      const last = e.buckets[e.buckets.length - 1];
      if (last[0] !== Infinity) throw new ExpositionError(0, `${where} has no +Inf bucket`);
      if (last[1] !== e.count) throw new ExpositionError(0, `${where}: +Inf bucket ${last[1]} != _count ${e.count}`);
    }
  }
  return families;
}

/** The value of the one sample of `name` whose labels include `labels`; undefined when none, an error when several. */
export function sampleValue(families: Map<string, Family>, name: string, labels: Record<string, string> = {}): number | undefined {
  const hits: Sample[] = [];
  for (const f of families.values()) {
    for (const s of f.samples) {
      if (s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v)) hits.push(s);
    }
  }
  if (hits.length > 1) throw new Error(`${hits.length} samples of ${name} match ${JSON.stringify(labels)}`);
  return hits[0]?.value;
}
