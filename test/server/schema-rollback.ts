/**
 * Makes a configuration database look as an older server left it: every table created by the
 * migrations after `version` is dropped and user_version set back, so a test can check that the
 * current server upgrades it in place (whatever migrations other features added since).
 */
import Database from 'better-sqlite3';
import { MIGRATIONS } from '../../src/server/config-db.js';

export function rollBackSchema(file: string, version: number, also?: (raw: Database.Database) => void): void {
  const raw = new Database(file);
  try {
    const tables = MIGRATIONS.slice(version).flatMap((m) => [...m.matchAll(/CREATE TABLE (?:IF NOT EXISTS )?(\w+)/g)].map((x) => x[1]!));
    raw.pragma('foreign_keys = OFF');
    for (const name of tables.reverse()) raw.exec(`DROP TABLE IF EXISTS ${name}`);
    raw.pragma(`user_version = ${version}`);
    also?.(raw);
  } finally {
    raw.close();
  }
}

/** The 1-based number of the migration whose text matches (the version a database has once it ran). */
export function migrationNumber(re: RegExp): number {
  const i = MIGRATIONS.findIndex((m) => re.test(m));
  if (i < 0) throw new Error(`no migration matches ${re}`);
  return i + 1;
}
