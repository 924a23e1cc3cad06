/** How the changed pages of a patched block become writes (replication-session's pageRuns). */
import t from 'tap';
import { pageRuns } from '../../src/server/replication-session.js';

t.test('changed pages become runs; runs closer than the gap merge', async (t) => {
  t.same(pageRuns([0, 15], 0), [[0, 0], [15, 15]], 'gap 0: every run is its own write');
  t.same(pageRuns([0, 1, 2, 5, 6, 9], 0), [[0, 2], [5, 6], [9, 9]], 'consecutive pages are one run');
  t.same(pageRuns([0, 1, 2, 5, 6, 10], 2), [[0, 6], [10, 10]], 'runs two pages apart merge with gap 2, three apart do not');
  t.same(pageRuns([0, 15], Infinity), [[0, 15]], 'Infinity: one write from the first to the last page');
  t.same(pageRuns([7], 0), [[7, 7]]);
  t.same(pageRuns([], 0), []);
});
