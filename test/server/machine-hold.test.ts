/** One recovery of a machine at a time (plan-api's holdMachines): plan runs, test failovers and failovers. */
import t from 'tap';
import { holdMachines } from '../../src/server/http/plan-api.js';

t.test('a held machine refuses another holder until released, whichever came first', async (t) => {
  const direct = holdMachines(['m1'], 'a test failover');
  t.throws(() => holdMachines(['m2', 'm1'], 'a run of recovery plan shop'), { code: 'MOB_ERR_PLAN', message: /machine m1 is being recovered by a test failover/ }, 'a plan run of a machine a direct test failover holds is refused');
  const other = holdMachines(['m2'], 'a failover');
  t.pass('a refused hold took nothing: m2 is free for another');
  direct();
  const plan = holdMachines(['m1', 'm1'], 'a run of recovery plan shop');
  t.throws(() => holdMachines(['m1'], 'a failover'), { code: 'MOB_ERR_PLAN', message: /a run of recovery plan shop/ }, 'and the other way round');
  plan();
  other();
  const again = holdMachines(['m1', 'm2'], 'a test failover');
  again();
  direct();
  t.doesNotThrow(() => holdMachines(['m1'], 'x')(), 'a release called twice frees nothing it does not hold');
});
