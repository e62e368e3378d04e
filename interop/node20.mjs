// js-libp2p 3.x calls Promise.withResolvers (Node >= 22); this machine has Node 20.
// Imported first by hostile.mjs so it is defined before any libp2p module runs.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function withResolvers () {
    let resolve, reject
    const promise = new this((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}
