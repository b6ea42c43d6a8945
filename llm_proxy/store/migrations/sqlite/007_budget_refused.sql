-- The least a request refused budget_exceeded for good needed (nano-dollars), since the token's
-- budget was last set: what tells the token's status that its budget is spent, when what is left
-- is more than nothing but less than its requests cost. NULL: none refused.
ALTER TABLE tokens ADD COLUMN budget_refused_nanousd INTEGER;
