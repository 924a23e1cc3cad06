/** The target conformance suite against the Azure page-blob backend, on a real Azurite (fails, never skips, without it). */
import t from 'tap';
import { startAzurite, type Azurite } from '../azurite.js';
import { backendOn } from './azure/helpers.js';
import { runConformance } from './conformance.js';

let az: Azurite | null = null;
runConformance(t, 'azure page blobs', async (tt) => {
  az ??= await startAzurite(t);
  return { backend: await backendOn(tt, az) };
});
