-- bars.profile_coarse (1: the price range was too wide for the bin cap, profile_bin is 10^k x the
-- instrument bin) for stores created before it existed; stores created since have it from 001.
ALTER TABLE bars ADD COLUMN IF NOT EXISTS profile_coarse UInt8 DEFAULT 0 AFTER profile_bin;
