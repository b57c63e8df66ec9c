-- KEYS[1] record. How long the key's lease still runs, if it is in progress.
local record, problem = read(KEYS[1])
if record == nil then
  return { 'x', problem }
end
if record and record.st == 'p' and record.until_ms > now_ms then
  return { 'p', record.until_ms - now_ms }
end
return { 'n' }
