//! Cholesky factor of a correlation matrix, which may be only semi-definite
//! (perfectly correlated assets are allowed).

/// A pivot this far below zero means the matrix is not positive semi-definite.
const NEGATIVE_PIVOT: f64 = -1e-9;
/// A pivot this close to zero is zero: the row depends on the ones above it.
const ZERO_PIVOT: f64 = 1e-12;
/// What is left of an off-diagonal entry under a zero pivot must be this small.
const ZERO_RESIDUAL: f64 = 1e-6;

/// The lower-triangular `L` with `L·Lᵀ = matrix`, packed by rows (row `i`
/// holds `i + 1` entries). `Err` names the row where the matrix stops being
/// positive semi-definite.
pub fn cholesky(matrix: &[Vec<f64>]) -> Result<Vec<f64>, usize> {
    let n = matrix.len();
    let mut factor = vec![0.0; n * (n + 1) / 2];
    let start = |i: usize| i * (i + 1) / 2;
    for j in 0..n {
        let row_j = start(j);
        let pivot = matrix[j][j] - dot(&factor[row_j..row_j + j], &factor[row_j..row_j + j]);
        if pivot < NEGATIVE_PIVOT {
            return Err(j);
        }
        let diagonal = if pivot > ZERO_PIVOT {
            pivot.sqrt()
        } else {
            0.0
        };
        factor[row_j + j] = diagonal;
        for (i, row) in matrix.iter().enumerate().skip(j + 1) {
            let row_i = start(i);
            let residual = row[j] - dot(&factor[row_i..row_i + j], &factor[row_j..row_j + j]);
            factor[row_i + j] = if diagonal > 0.0 {
                residual / diagonal
            } else if residual.abs() <= ZERO_RESIDUAL {
                0.0
            } else {
                return Err(i);
            };
        }
    }
    Ok(factor)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rebuild(factor: &[f64], n: usize) -> Vec<Vec<f64>> {
        let at = |i: usize, k: usize| {
            if k <= i {
                factor[i * (i + 1) / 2 + k]
            } else {
                0.0
            }
        };
        (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| (0..n).map(|k| at(i, k) * at(j, k)).sum())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn factors_a_definite_matrix() {
        let m = vec![
            vec![1.0, 0.5, 0.2],
            vec![0.5, 1.0, -0.3],
            vec![0.2, -0.3, 1.0],
        ];
        let factor = cholesky(&m).expect("definite");
        for (row, want) in rebuild(&factor, 3).iter().zip(&m) {
            for (got, want) in row.iter().zip(want) {
                assert!((got - want).abs() < 1e-15);
            }
        }
    }

    #[test]
    fn accepts_perfect_correlation() {
        let m = vec![
            vec![1.0, 1.0, 0.5],
            vec![1.0, 1.0, 0.5],
            vec![0.5, 0.5, 1.0],
        ];
        let factor = cholesky(&m).expect("semi-definite");
        assert_eq!(factor[1..3], [1.0, 0.0]);
        assert!((rebuild(&factor, 3)[2][2] - 1.0).abs() < 1e-15);
    }

    #[test]
    fn rejects_an_indefinite_matrix() {
        let m = vec![
            vec![1.0, 0.9, -0.9],
            vec![0.9, 1.0, 0.9],
            vec![-0.9, 0.9, 1.0],
        ];
        assert_eq!(cholesky(&m), Err(2));
        let m = vec![
            vec![1.0, 1.0, 0.0],
            vec![1.0, 1.0, 0.5],
            vec![0.0, 0.5, 1.0],
        ];
        assert_eq!(cholesky(&m), Err(2));
    }
}
