/** The target conformance suite against the local file backend. */
import t from 'tap';
import path from 'node:path';
import { LocalBackend } from '../../src/target/local/local-backend.js';
import { tmpDir } from '../helpers.js';
import { runConformance } from './conformance.js';

runConformance(t, 'local files', async (t) => {
  const root = await tmpDir(t, 'conf-local-');
  const backend = new LocalBackend({ dir: path.join(root, 'replicas'), imagesDir: root });
  await backend.init();
  return { backend };
});
