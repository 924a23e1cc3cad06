/**
 * agent.json: docs/operations.md documents exactly the keys loadAgentConfig knows, with their
 * types; loadAgentConfig refuses what breaks the documented rules.
 */
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import t from 'tap';
import { AGENT_CONFIG_KEYS, LOG_LEVELS, loadAgentConfig } from '../../src/agent/config.js';
import { tmpDir } from '../helpers.js';

t.test('docs/operations.md documents every key of agent.json, and only those', async (t) => {
  const md = fs.readFileSync(fileURLToPath(new URL('../../../docs/operations.md', import.meta.url)), 'utf8');
  const start = md.indexOf('### The agent\'s configuration file: `agent.json`');
  t.ok(start >= 0, 'the section exists');
  const section = md.slice(start, md.indexOf('\n### ', start + 1));
  const rows = [...section.matchAll(/^\| `(\w+)` \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$/gm)];
  const documented = rows.map((r) => r[1]);
  t.same([...documented].sort(), Object.keys(AGENT_CONFIG_KEYS).sort(), 'the table lists exactly the keys of the code');
  for (const [, key, type, def, meaning] of rows) {
    t.match(type, new RegExp(`^${AGENT_CONFIG_KEYS[key as keyof typeof AGENT_CONFIG_KEYS]}\\b`), `${key}: its type`);
    t.ok(def.trim() && meaning.trim().length > 20, `${key}: a default and a meaning`);
  }
  for (const level of LOG_LEVELS) t.match(section, `\`${level}\``, `log level ${level} is documented`);
  const example = /```json\n([\s\S]*?)```/.exec(section);
  t.ok(example, 'an example');
  const file = path.join(await tmpDir(t), 'agent.json');
  await fsp.writeFile(file, example![1]);
  const c = await loadAgentConfig(file);
  t.equal(c.server, 'wss://dr.example.net:7443', 'the example loads');
  t.ok(Object.keys(c).every((k) => k in AGENT_CONFIG_KEYS), 'and uses documented keys only');
});

t.test('loadAgentConfig: what the documentation says is refused is refused', async (t) => {
  const dir = await tmpDir(t);
  const file = path.join(dir, 'agent.json');
  const base = { server: 'wss://dr:7443', stateDir: '/var/lib/mobility' };
  const load = async (c: unknown) => {
    await fsp.writeFile(file, JSON.stringify(c));
    return loadAgentConfig(file);
  };
  t.same(await load({ ...base, unknownKey: 1 }), { ...base, unknownKey: 1 }, 'unknown keys are ignored (kept)');
  t.same(await load({ ...base, inventoryIntervalMs: 60_000, logLevel: 'debug' }), { ...base, inventoryIntervalMs: 60_000, logLevel: 'debug' });
  const bad: [unknown, RegExp][] = [
    [null, /not a JSON object/],
    [[base], /not a JSON object/],
    [{ stateDir: '/x' }, /"server" must be a wss:\/\/ URL/],
    [{ ...base, server: 'ws://dr:7443' }, /"server" must be a wss:\/\/ URL/],
    [{ ...base, stateDir: 'relative' }, /"stateDir" must be an absolute path/],
    [{ ...base, inventoryIntervalMs: '15m' }, /"inventoryIntervalMs" must be a number/],
    [{ ...base, inventoryIntervalMs: 10 }, /from 1000 to 2147483647/],
    [{ ...base, inventoryIntervalMs: 2 ** 31 }, /from 1000 to 2147483647/],
    [{ ...base, logLevel: 'loud' }, /"logLevel" must be one of error, warn, info/],
    [{ ...base, hooksDir: 5 }, /"hooksDir" must be a string/],
    [{ ...base, pin: true }, /"pin" must be a string/],
  ];
  for (const [c, message] of bad) await t.rejects(load(c), { code: 'MOB_ERR_CONFIG', message }, JSON.stringify(c));
  await fsp.writeFile(file, '{');
  await t.rejects(loadAgentConfig(file), { code: 'MOB_ERR_CONFIG', message: /is not JSON/ });
});
