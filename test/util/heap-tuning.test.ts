import t from 'tap';
import { HEAP_GROWING_PERCENT, HEAP_TUNING_MAX_LIVE_BYTES, heapGrowingPercent, tuningApplies } from '../../src/util/heap-tuning.js';

t.test('the growing percent: default, override, refusal', async (t) => {
  t.equal(heapGrowingPercent({}), HEAP_GROWING_PERCENT);
  t.equal(heapGrowingPercent({ MOBILITY_HEAP_GROWING_PERCENT: '0' }), 0, '0 leaves V8 alone');
  t.equal(heapGrowingPercent({ MOBILITY_HEAP_GROWING_PERCENT: '150' }), 150);
  for (const bad of ['-1', '1001', '2.5', 'lots']) {
    t.throws(() => heapGrowingPercent({ MOBILITY_HEAP_GROWING_PERCENT: bad }), { code: 'MOB_ERR_CONFIG' }, `${bad} is refused`);
  }
});

t.test('the tuned factor applies to small heaps only', async (t) => {
  t.equal(tuningApplies(20 * 1024 * 1024), true);
  t.equal(tuningApplies(HEAP_TUNING_MAX_LIVE_BYTES), true);
  t.equal(tuningApplies(HEAP_TUNING_MAX_LIVE_BYTES + 1), false, 'a grown heap gets V8\'s own factors back');
});
