// Sogni's official JavaScript SDK (@sogni-ai/sogni-client 5.54.0, unmodified, pinned in
// package-lock.json) against this network's gateway, as a Node app would use it. Run by
// tests/gateway/test_official_sdks.py.
//
// argv[2]: JSON {url, key, poorKey, limitKey, badKey, model, unservedModel, appId, cancelSteps}
// (`unservedModel`: offered by the gateway, rendered by no node: its images wait in the queue,
// then fail with the dispatcher's "no node" reason). Prints one JSON object,
// the outcome of each scenario, on the last line of stdout. A scenario that fails records its
// error and the next one still runs.
import { SogniClient } from '@sogni-ai/sogni-client';

const cfg = JSON.parse(process.argv[2]);
const TIMEOUT_MS = 60_000;
const PROMPT = 'a red circle on a blue background';
const out = {};

// The SDK fetches /v1/account/me without a catch after auth: with a refused key that is an
// unhandled rejection, which would end Node. An app that wants to survive records it.
const unhandled = [];
process.on('unhandledRejection', (reason) => {
  unhandled.push(String(reason?.message ?? reason?.status ?? JSON.stringify(reason)));
});

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const errText = (e) =>
  e instanceof Error ? `${e.name}: ${e.message}` : JSON.stringify(e ?? null);

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timeout: ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function client(key, appId) {
  return SogniClient.createInstance({
    appId,
    apiKey: key,
    restEndpoint: cfg.url,
    socketEndpoint: cfg.url.replace('http://', 'ws://'),
    network: 'fast',
    logLevel: 'error',
  });
}

function project(n, extra = {}) {
  return {
    type: 'image',
    modelId: cfg.model,
    positivePrompt: PROMPT,
    numberOfMedia: n,
    tokenType: 'spark',
    ...extra,
  };
}

const spark = (balance) => Number(balance.spark.net);
const errorOf = (e) =>
  e ? { code: e.code ?? null, originalCode: e.originalCode ?? null, message: e.message ?? null } : null;

async function until(cond, ms, what) {
  const deadline = Date.now() + ms;
  while (!cond() && Date.now() < deadline) await sleep(20);
  if (!cond()) throw new Error(`timeout: ${typeof what === 'function' ? what() : what}`);
}

async function step(name, fn) {
  const started = Date.now();
  try {
    out[name] = { ok: true, ...(await fn()) };
  } catch (e) {
    out[name] = { ok: false, error: errText(e), stack: e?.stack?.slice(0, 1500) };
  }
  out[name].seconds = (Date.now() - started) / 1000;
}

async function badKey() {
  const sogni = await client(cfg.badKey, `${cfg.appId}-bad`);
  const closed = new Promise((resolve) => {
    sogni.apiClient.on('disconnected', (data) => resolve(data?.code ?? null));
  });
  // expected: the socket closes before any model list arrives
  const models = sogni.projects.waitForModels(8000).catch(() => null);
  const first = await Promise.race([closed.then(() => null), models]);
  const code = await withTimeout(closed, 10_000, 'socket close').catch(() => null);
  // the SDK's own /v1/account/me may get its 401 first and sign out, closing the socket
  // itself (then no 4021 arrives): either way the key is refused
  const signedOut = !sogni.apiClient.auth.isAuthenticated;
  let meStatus = null;
  try {
    await sogni.account.me();
  } catch (e) {
    meStatus = e?.status ?? errText(e);
  }
  sogni.dispose();
  return { refused: first === null, closeCode: code, signedOut, meStatus };
}

async function insufficient() {
  const sogni = await client(cfg.poorKey, `${cfg.appId}-poor`);
  try {
    await sogni.projects.waitForModels(15_000);
    const p = await sogni.projects.create(project(1));
    try {
      const urls = await withTimeout(p.waitForCompletion(), TIMEOUT_MS, 'insufficient');
      return { ok: false, error: `rendered ${urls.length} without funds` };
    } catch (e) {
      return { failed: true, code: e?.code ?? null, message: e?.message ?? errText(e) };
    }
  } finally {
    sogni.dispose();
  }
}

async function overLimit() {
  // a funded key whose daily limit is below one image's price
  const sogni = await client(cfg.limitKey, `${cfg.appId}-limit`);
  try {
    await sogni.projects.waitForModels(15_000);
    const p = await sogni.projects.create(project(1));
    try {
      const urls = await withTimeout(p.waitForCompletion(), TIMEOUT_MS, 'over limit');
      return { ok: false, error: `rendered ${urls.length} over the daily limit` };
    } catch (e) {
      return { failed: true, code: e?.code ?? null, message: e?.message ?? errText(e) };
    }
  } finally {
    sogni.dispose();
  }
}

async function mainFlow() {
  const sogni = await client(cfg.key, cfg.appId);
  const socket = sogni.apiClient.socket;
  const sent = [];
  const realSend = socket.send.bind(socket);
  socket.send = (type, data) => {
    sent.push([type, data]);
    return realSend(type, data);
  };
  const balance = async () => spark(await sogni.account.refreshBalance());

  await step('auth', async () => {
    const me = await sogni.account.me();
    return { walletAddress: me?.walletAddress ?? sogni.account.currentAccount.walletAddress };
  });
  await step('models', async () => {
    const listed = await sogni.projects.waitForModels(15_000);
    return { models: Object.fromEntries(listed.map((m) => [m.id, m.workerCount])) };
  });
  await step('render', async () => {
    const before = await balance();
    const p = await sogni.projects.create(project(2));
    const urls = await withTimeout(p.waitForCompletion(), TIMEOUT_MS, 'render');
    const downloads = [];
    for (const url of urls) {
      const got = await fetch(url); // no auth headers: the URL carries its signature
      const bytes = new Uint8Array(await got.arrayBuffer());
      downloads.push({
        status: got.status,
        type: got.headers.get('content-type'),
        png: bytes[0] === 0x89 && bytes[1] === 0x50 && bytes[2] === 0x4e && bytes[3] === 0x47,
        bytes: bytes.length,
      });
    }
    const forged = await fetch(urls[0].replace('sig=', 'sig=A'));
    const after = await balance();
    return {
      projectId: p.id,
      urls,
      downloads,
      forgedStatus: forged.status,
      charged: Number((before - after).toFixed(6)),
    };
  });
  await step('reconnect', async () => {
    // The socket drops mid-project; the SDK reconnects on its own and, without re-sending the
    // accepted jobRequest, gets the rest of the project on its new socket (the gateway resumes
    // an app's in-flight projects there).
    const before = await balance();
    const p = await sogni.projects.create(project(2));
    const requests = sent.filter(([t, d]) => t === 'jobRequest' && d.jobID === p.id);
    if (requests.length !== 1) throw new Error(`${requests.length} jobRequests recorded`);
    const deadline = Date.now() + 20_000;
    while (p.jobs.length === 0 && !p.finished && Date.now() < deadline) await sleep(50);
    const reconnected = new Promise((resolve) => sogni.apiClient.once('connected', resolve));
    socket.socket.terminate(); // a dropped connection (1006), not a close: the SDK reconnects
    await withTimeout(reconnected, 30_000, 'reconnect');
    const urls = await withTimeout(p.waitForCompletion(), TIMEOUT_MS, 'reconnect render');
    const after = await balance();
    const sentAgain = sent.filter(([t, d]) => t === 'jobRequest' && d.jobID === p.id).length - 1;
    return { urls, charged: Number((before - after).toFixed(6)), dropped: true, sentAgain };
  });
  await step('cancel', async () => {
    const before = await balance();
    const slow = cfg.cancelSteps ? { steps: cfg.cancelSteps } : {};
    const p = await sogni.projects.create(project(4, slow));
    await p.cancel();
    let outcome;
    try {
      const urls = await withTimeout(p.waitForCompletion(), TIMEOUT_MS, 'cancel');
      outcome = `completed with ${urls.length} urls`;
    } catch (e) {
      outcome = `rejected: ${e?.message ?? errText(e)}`;
    }
    await sleep(500); // let a refund land before reading the balance
    const after = await balance();
    return { outcome, status: p.status, charged: Number((before - after).toFixed(6)) };
  });
  let waiting = null;
  await step('queue', async () => {
    // two projects of a model no node serves wait in the queue, the second behind the first;
    // once the first is cancelled the second is told it moved up
    const first = await sogni.projects.create(project(1, { modelId: cfg.unservedModel }));
    const second = await sogni.projects.create(project(2, { modelId: cfg.unservedModel }));
    waiting = second;
    const seen = [second.queuePosition];
    second.on('updated', () => {
      if (seen[seen.length - 1] !== second.queuePosition) seen.push(second.queuePosition);
    });
    await until(
      () => first.queuePosition === 0 && second.queuePosition === 1,
      4000,
      () => `queue positions ${first.queuePosition}, ${second.queuePosition}`
    );
    await first.cancel();
    await until(() => second.queuePosition === 0, 4000, 'the second project moving up');
    return { first: first.queuePosition, seen };
  });
  await step('failed', async () => {
    // every image of the waiting project fails (no node): the rejection and the project's
    // error once the project-level jobError came both carry the images' own reason
    if (!waiting) throw new Error('no waiting project');
    let rejected = null;
    try {
      await withTimeout(waiting.waitForCompletion(), TIMEOUT_MS, 'failed project');
    } catch (e) {
      rejected = e;
    }
    await sleep(500); // the project-level jobError follows the images' own
    return {
      status: waiting.status,
      rejected: errorOf(rejected),
      projectError: errorOf(waiting.error),
      jobErrors: waiting.jobs.map((j) => errorOf(j.error)),
    };
  });
  out.final_balance = await balance();
  sogni.dispose();
}

async function recover() {
  // An app restarts (a new client, the same appId) while its project waits in the queue: the
  // `authenticated` frame lists the project in `activeProjects`, the SDK tracks it again and
  // its events follow (here: its images fail, no node serves the model).
  const appId = `${cfg.appId}-recover`;
  const before = await client(cfg.key, appId);
  let id;
  try {
    await before.projects.waitForModels(15_000);
    const p = await before.projects.create(project(2, { modelId: cfg.unservedModel }));
    id = p.id;
    await until(() => p.status === 'queued', 4000, 'queued');
  } finally {
    before.dispose();
  }
  const after = await client(cfg.key, appId);
  try {
    let recovered = null;
    after.projects.on('activeProjectsRecovered', (list) => {
      recovered = list.find((r) => r.id === id) ?? recovered;
    });
    let tracked;
    await until(
      () => (tracked = after.projects.trackedProjects.find((t) => t.id === id)),
      10_000,
      'the project tracked again'
    );
    let rejected = null;
    try {
      await withTimeout(tracked.waitForCompletion(), TIMEOUT_MS, 'recovered project');
    } catch (e) {
      rejected = e;
    }
    return {
      ok: true,
      id,
      recovered: recovered && {
        model: recovered.model?.id,
        imageCount: recovered.imageCount,
        status: recovered.status,
        appId: recovered.appId,
      },
      params: { modelId: tracked.params.modelId, numberOfMedia: tracked.params.numberOfMedia },
      status: tracked.status,
      rejected: errorOf(rejected),
    };
  } finally {
    after.dispose();
  }
}

for (const [name, fn] of [
  ['bad_key', badKey],
  ['insufficient', insufficient],
  ['over_limit', overLimit],
]) {
  try {
    out[name] = await fn();
  } catch (e) {
    out[name] = { ok: false, error: errText(e) };
  }
}
try {
  await mainFlow();
} catch (e) {
  out.main_error = `${errText(e)}\n${e?.stack ?? ''}`;
}
try {
  out.recover = await recover();
} catch (e) {
  out.recover = { ok: false, error: errText(e), stack: e?.stack?.slice(0, 1500) };
}
out.unhandled = unhandled;
console.log(JSON.stringify(out));
process.exit(0);
