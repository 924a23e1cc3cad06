import t from 'tap';
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import { ERROR_CODES, MobilityError, toMobilityError } from '../src/errors.js';

t.test('docs/errors.md documents exactly the codes in src/errors.ts, with the same retryable flag', async (t) => {
  const md = fs.readFileSync(fileURLToPath(new URL('../../docs/errors.md', import.meta.url)), 'utf8');
  const sections = md.split(/^## /m).slice(1).filter((s) => s.startsWith('MOB_ERR_'));
  const documented = sections.map((s) => s.split('\n')[0].trim());
  t.same([...documented].sort(), Object.keys(ERROR_CODES).sort());
  for (const s of sections) {
    const code = s.split('\n')[0].trim() as keyof typeof ERROR_CODES;
    const m = /retryable:?\**\s*(yes|no)/i.exec(s);
    t.ok(m, `${code} states whether it is retryable`);
    if (m && ERROR_CODES[code]) t.equal(m[1].toLowerCase() === 'yes', ERROR_CODES[code].retryable, `${code} retryable flag agrees`);
  }
});

t.test('system errors map to codes', async (t) => {
  t.equal(toMobilityError(Object.assign(new Error('x'), { code: 'ENOSPC' })).code, 'MOB_ERR_NO_SPACE');
  t.equal(toMobilityError(Object.assign(new Error('x'), { code: 'ECONNREFUSED' })).code, 'MOB_ERR_UNREACHABLE');
  t.equal(toMobilityError(new Error('x')).code, 'MOB_ERR_INTERNAL');
  const e = new MobilityError('MOB_ERR_AUTH', 'no');
  t.equal(toMobilityError(e), e);
  t.equal(e.retryable, false);
});
