//! Seeded, class-balanced subsets and splits (for the 1% / 10% label experiments).

use crate::{Error, Result};
use pretext_core::seed::{permutation, stream_rng};

/// Picks `round(fraction * n)` indices, spread over the classes as evenly as
/// possible (each class gets `total / classes`, the remainder going to the
/// lowest class indices; a class with too few items gives all it has and the
/// rest is spread over the others). Deterministic under `seed`; sorted.
///
/// # Errors
/// [`Error::Invalid`] when `fraction` is not in (0, 1].
pub fn balanced_subset(labels: &[u32], fraction: f64, seed: u64) -> Result<Vec<usize>> {
    if !(fraction > 0.0 && fraction <= 1.0) {
        return Err(Error::Invalid(format!("label fraction {fraction} must lie in (0, 1]")));
    }
    let total = ((labels.len() as f64) * fraction).round().max(1.0) as usize;
    balanced_count(labels, total, seed)
}

/// As [`balanced_subset`], for an absolute number of items.
///
/// # Errors
/// [`Error::Invalid`] when `total` exceeds the number of items.
pub fn balanced_count(labels: &[u32], total: usize, seed: u64) -> Result<Vec<usize>> {
    if total > labels.len() {
        return Err(Error::Invalid(format!("asked for {total} items of {}", labels.len())));
    }
    let nc = labels.iter().max().map_or(0, |m| *m as usize + 1);
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); nc];
    for (i, &l) in labels.iter().enumerate() {
        by_class[l as usize].push(i);
    }
    for (c, items) in by_class.iter_mut().enumerate() {
        let perm = permutation(
            items.len(),
            &mut stream_rng(seed, pretext_core::seed::EVAL, &[c as u64]),
        );
        let shuffled: Vec<usize> = perm.iter().map(|&p| items[p]).collect();
        *items = shuffled;
    }
    // Water-filling: give each non-exhausted class an equal share until `total` is reached.
    let mut take = vec![0usize; nc];
    let mut left = total;
    loop {
        let open: Vec<usize> = (0..nc).filter(|&c| take[c] < by_class[c].len()).collect();
        if left == 0 || open.is_empty() {
            break;
        }
        let share = (left / open.len()).max(1);
        for c in open {
            if left == 0 {
                break;
            }
            let add = share.min(by_class[c].len() - take[c]).min(left);
            take[c] += add;
            left -= add;
        }
    }
    let mut out: Vec<usize> = (0..nc).flat_map(|c| by_class[c][..take[c]].iter().copied()).collect();
    out.sort_unstable();
    Ok(out)
}

/// `min(k, n)` seeded distinct items of `0..n`, sorted (a fixed sample of unlabelled data).
pub fn seeded_sample(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let perm = permutation(n, &mut stream_rng(seed, pretext_core::seed::EVAL, &[u64::MAX - 1]));
    let mut out: Vec<usize> = perm[..k.min(n)].to_vec();
    out.sort_unstable();
    out
}

/// Splits `0..n` into (first, second) with `round(fraction * n)` seeded random
/// items in the second part (e.g. a validation split). Both sorted.
///
/// # Errors
/// [`Error::Invalid`] when `fraction` is not in [0, 1).
pub fn split(n: usize, fraction: f64, seed: u64) -> Result<(Vec<usize>, Vec<usize>)> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(Error::Invalid(format!("split fraction {fraction} must lie in [0, 1)")));
    }
    let k = ((n as f64) * fraction).round() as usize;
    let perm = permutation(n, &mut stream_rng(seed, pretext_core::seed::EVAL, &[u64::MAX]));
    let mut second: Vec<usize> = perm[..k].to_vec();
    let mut first: Vec<usize> = perm[k..].to_vec();
    first.sort_unstable();
    second.sort_unstable();
    Ok((first, second))
}

/// A stratified split of labelled items: per class, a seeded `test_fraction`
/// (rounded, at least one when the class has two or more items, never all
/// of them) goes to the second part. Both parts sorted.
///
/// # Errors
/// [`Error::Invalid`] when `test_fraction` is not in (0, 1).
pub fn stratified_split(labels: &[u32], test_fraction: f64, seed: u64) -> Result<(Vec<usize>, Vec<usize>)> {
    if !(test_fraction > 0.0 && test_fraction < 1.0) {
        return Err(Error::Invalid(format!(
            "test fraction {test_fraction}: must be in (0, 1)"
        )));
    }
    let classes = labels.iter().copied().max().map_or(0, |m| m as usize + 1);
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for c in 0..classes {
        let idx: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] as usize == c).collect();
        let mut rng = stream_rng(seed, "probe-split", &[c as u64]);
        let perm = permutation(idx.len(), &mut rng);
        let n_test = if idx.len() >= 2 {
            ((idx.len() as f64 * test_fraction).round() as usize).clamp(1, idx.len() - 1)
        } else {
            0
        };
        for (k, &p) in perm.iter().enumerate() {
            if k < n_test {
                test.push(idx[p]);
            } else {
                train.push(idx[p]);
            }
        }
    }
    train.sort_unstable();
    test.sort_unstable();
    Ok((train, test))
}

/// Deals a seeded permutation of `0..n` into `k` folds of sizes differing by
/// at most one; returns `(train, validation)` per fold, each sorted: every
/// index is validated exactly once (k-fold cross-validation).
///
/// # Errors
/// [`Error::Invalid`] when `k < 2` or `k > n`.
pub fn folds(n: usize, k: usize, seed: u64) -> Result<Vec<(Vec<usize>, Vec<usize>)>> {
    if k < 2 || k > n {
        return Err(Error::Invalid(format!(
            "{k}-fold cross-validation needs 2 <= k <= n = {n}"
        )));
    }
    let perm = permutation(n, &mut stream_rng(seed, pretext_core::seed::EVAL, &[u64::MAX - 1]));
    Ok((0..k)
        .map(|f| {
            let (mut tr, mut va) = (Vec::new(), Vec::new());
            for (pos, &i) in perm.iter().enumerate() {
                if pos % k == f {
                    va.push(i);
                } else {
                    tr.push(i);
                }
            }
            tr.sort_unstable();
            va.sort_unstable();
            (tr, va)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<u32> {
        (0..1000).map(|i| (i % 10) as u32).collect()
    }

    #[test]
    fn folds_validate_every_index_once() -> Result<()> {
        let f = folds(23, 5, 3)?;
        assert_eq!(f.len(), 5);
        let mut seen = [0usize; 23];
        for (tr, va) in &f {
            assert!(va.len() == 4 || va.len() == 5, "fold sizes {}", va.len());
            assert_eq!(tr.len() + va.len(), 23);
            assert!(tr.iter().all(|i| va.binary_search(i).is_err()));
            for &i in va {
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c == 1));
        assert_eq!(f, folds(23, 5, 3)?);
        assert_ne!(f, folds(23, 5, 4)?);
        assert!(folds(3, 5, 0).is_err() && folds(10, 1, 0).is_err());
        Ok(())
    }

    #[test]
    fn balanced_counts_per_class() -> Result<()> {
        let l = labels();
        let s = balanced_subset(&l, 0.1, 0)?;
        assert_eq!(s.len(), 100);
        for c in 0..10 {
            assert_eq!(s.iter().filter(|&&i| l[i] == c).count(), 10);
        }
        let s = balanced_count(&l, 23, 0)?;
        let counts: Vec<usize> = (0..10).map(|c| s.iter().filter(|&&i| l[i] == c).count()).collect();
        assert_eq!(counts.iter().sum::<usize>(), 23);
        assert!(counts.iter().all(|&c| c == 2 || c == 3), "{counts:?}");
        Ok(())
    }

    #[test]
    fn small_classes_give_all_they_have() -> Result<()> {
        let mut l = vec![0u32; 100];
        l.extend([1, 1]);
        let s = balanced_count(&l, 20, 1)?;
        assert_eq!(s.len(), 20);
        assert_eq!(s.iter().filter(|&&i| l[i] == 1).count(), 2);
        Ok(())
    }

    #[test]
    fn seeded_and_distinct() -> Result<()> {
        let l = labels();
        assert_eq!(balanced_subset(&l, 0.05, 3)?, balanced_subset(&l, 0.05, 3)?);
        assert_ne!(balanced_subset(&l, 0.05, 3)?, balanced_subset(&l, 0.05, 4)?);
        let s = balanced_subset(&l, 0.05, 3)?;
        let mut d = s.clone();
        d.dedup();
        assert_eq!(d.len(), s.len());
        assert!(balanced_subset(&l, 0.0, 0).is_err());
        Ok(())
    }

    #[test]
    fn split_partitions() -> Result<()> {
        let (a, b) = split(100, 0.2, 5)?;
        assert_eq!((a.len(), b.len()), (80, 20));
        let mut all: Vec<usize> = a.iter().chain(&b).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        Ok(())
    }
}
