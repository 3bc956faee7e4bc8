-- The task make bench runs on a Squall worker: "bench.noop" does nothing.
return { noop = function() end }
