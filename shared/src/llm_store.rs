//! Redis operations of the `llm` step kind: the shared response cache and the token
//! budgets (`llm_budget.lua`). Keys come from [`crate::keys::Keys`].

use crate::scripts::Scripts;
use crate::store::{Result, Store};
use std::time::Duration;

/// Usage after a budget check or charge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetUsage {
    /// Tokens this process has used.
    pub process_tokens: u64,
    /// Tokens all processes of its type used today (UTC).
    pub type_tokens_today: u64,
    pub over: BudgetOver,
}

/// Which budget is spent, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetOver {
    No,
    Process,
    TypeDaily,
}

/// One budget check (`add_tokens` = 0) or charge.
#[derive(Debug, Clone)]
pub struct BudgetCall<'a> {
    pub process_id: &'a str,
    pub process_type: &'a str,
    /// The UTC day, `yyyymmdd`.
    pub day: &'a str,
    pub add_tokens: u64,
    pub add_cost_micro_usd: u64,
    /// 0 = none.
    pub process_cap: u64,
    /// 0 = none.
    pub type_daily_cap: u64,
    pub process_ttl: Duration,
}

/// One `llm_budget.lua` call in `store`'s partition: (process tokens, type tokens, over).
async fn budget_call(
    store: &Store,
    keys: &[crate::keys::Key],
    mode: &str,
    call: &BudgetCall<'_>,
) -> Result<(u64, u64, u8)> {
    let mut inv = Scripts::get().llm_budget.prepare_invoke();
    for k in keys {
        inv.key(k);
    }
    inv.arg(call.add_tokens)
        .arg(call.add_cost_micro_usd)
        .arg(call.process_cap)
        .arg(call.type_daily_cap)
        .arg(call.process_ttl.as_secs().max(1))
        .arg(2 * 86_400)
        .arg(mode);
    inv.invoke_async(&mut store.conn()).await
}

impl Store {
    /// Checks (and with `add_tokens` > 0 charges) the token budgets (`llm_budget.lua`).
    /// The type's daily counters live in partition 0, the process's usage in its own
    /// partition: one call when that is partition 0 (always with one partition), else one
    /// call for each (counters only add, so nothing needs the two in one step).
    pub async fn llm_budget(&self, call: &BudgetCall<'_>) -> Result<BudgetUsage> {
        let home = self.of(call.process_id);
        let zero = self.in_partition(0);
        let usage = home.keys().llm_usage(call.process_id);
        let day = (
            zero.keys().llm_type_usage(call.process_type, call.day),
            zero.keys().llm_type_cost(call.process_type, call.day),
        );
        let (p, t) = if home.partition() == 0 {
            let (p, t, _) = budget_call(&home, &[usage, day.0, day.1], "all", call).await?;
            (p, t)
        } else {
            let (p, _, _) = budget_call(&home, &[usage], "process", call).await?;
            let (_, t, _) = budget_call(&zero, &[day.0, day.1], "type", call).await?;
            (p, t)
        };
        let over = if call.process_cap > 0 && p >= call.process_cap {
            BudgetOver::Process
        } else if call.type_daily_cap > 0 && t >= call.type_daily_cap {
            BudgetOver::TypeDaily
        } else {
            BudgetOver::No
        };
        Ok(BudgetUsage {
            process_tokens: p,
            type_tokens_today: t,
            over,
        })
    }

    /// LLM tokens and estimated cost (micro-USD) charged to process `id` so far, if any
    /// `llm` step of it has called a provider.
    pub async fn llm_usage(&self, id: &str) -> Result<Option<(u64, u64)>> {
        let (tokens, cost): (Option<u64>, Option<u64>) = redis::cmd("HMGET")
            .arg(self.keys_of(id).llm_usage(id))
            .arg("tokens")
            .arg("cost_micro_usd")
            .query_async(&mut self.conn())
            .await?;
        Ok(tokens.map(|t| (t, cost.unwrap_or(0))))
    }

    /// LLM tokens and cost (micro-USD) charged to each of `process_types` on the UTC day
    /// `day` (`yyyymmdd`, [`utc_day`]): two pipelined `GET`s per type.
    pub async fn llm_usage_on(&self, process_types: &[&str], day: &str) -> Result<Vec<(u64, u64)>> {
        if process_types.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for t in process_types {
            pipe.cmd("GET").arg(self.keys().llm_type_usage(t, day));
            pipe.cmd("GET").arg(self.keys().llm_type_cost(t, day));
        }
        let v: Vec<Option<u64>> = pipe.query_async(&mut self.conn()).await?;
        Ok(v.chunks(2)
            .map(|c| {
                (
                    c[0].unwrap_or_default(),
                    c.get(1).copied().flatten().unwrap_or_default(),
                )
            })
            .collect())
    }

    /// A cached LLM reply (JSON), if present.
    pub async fn llm_cache_get(&self, hash: &str) -> Result<Option<String>> {
        let v: Option<String> = redis::cmd("GET")
            .arg(self.keys().llm_cache(hash))
            .query_async(&mut self.conn())
            .await?;
        Ok(v)
    }

    /// Stores an LLM reply (JSON) for `ttl`.
    pub async fn llm_cache_put(&self, hash: &str, value: &str, ttl: Duration) -> Result<()> {
        let _: () = redis::cmd("SET")
            .arg(self.keys().llm_cache(hash))
            .arg(value)
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .query_async(&mut self.conn())
            .await?;
        Ok(())
    }
}

/// UTC `yyyymmdd` of a Unix time (civil-from-days).
pub fn utc_day(unix_secs: u64) -> String {
    let z = (unix_secs / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}{mo:02}{d:02}")
}
