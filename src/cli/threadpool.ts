/**
 * libuv's thread pool runs every asynchronous file read and write. Its default of 4 threads is
 * the agent's read depth under churn (dirty blocks are read several at a time while the
 * server's store writes and syncs on its own threads), so the CLI asks for 8 unless the
 * environment says otherwise. Imported first by main.ts: the pool reads the variable when the
 * first work item is queued, and nothing is queued while modules load.
 */
process.env.UV_THREADPOOL_SIZE ??= '8';
export {};
