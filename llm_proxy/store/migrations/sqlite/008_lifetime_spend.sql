-- Before 007 a token's spend counted only what its budget holds settled: the requests of a token
-- without a budget added nothing, so such a token carried over from then showed spent_usd 0, and a
-- budget set on it later started from 0 whatever it had spent. The hourly usage aggregates priced
-- those requests (since 003): a token without a budget starts from what they recorded, where that
-- is more than its spend (a database migrated to 007 earlier counts its later requests in both;
-- aggregates already pruned by their retention leave the spend as it is). Budgeted tokens are left
-- as they are: Redis may keep their spend too, and the two must agree.
-- A one-off rewrite of spent_nanousd, which the release of 007 counts for every token as this
-- one does: that release serves on it unchanged.
-- serves-from: 007
UPDATE tokens
SET spent_nanousd = (SELECT SUM(cost_nanousd) FROM usage_hourly WHERE token_id = tokens.id)
WHERE budget_nanousd IS NULL
  AND (SELECT SUM(cost_nanousd) FROM usage_hourly WHERE token_id = tokens.id) > spent_nanousd;
